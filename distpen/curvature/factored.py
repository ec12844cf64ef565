"""``FactoredMajorizer``: the Gauss-Newton majorizer kept as per-atom ``p × p`` blocks plus pairs.

It stores ``s·S_a`` for every atom (``K × p × p``) beside the pairs and the decoder; its products run
on the cluster over the same atom ranges as :func:`~distpen.curvature.evaluate.evaluate`.
"""

from __future__ import annotations

import numpy as np

from .._workers import kernel_threads, threads_per_task
from ..errors import InvalidArgumentError
from ..pairs import PairTable
from ._common import _child_path, _client
from ._vectors import VectorSource, as_vector_source
from .plan import DecoderPlan, _Part

__all__ = ["FactoredMajorizer"]


class FactoredMajorizer:
    """``H_GN`` in factored form: per-atom diagonal blocks ``s·S_a`` (``K × p × p``), the pairs and the decoder.

    ``matvec(v)`` reproduces ``scale·H_GN v`` exactly, on the cluster; the storage is
    ``K·p²`` numbers plus the pairs, the compact form for very large K.
    """

    def __init__(self, group):
        import zarr

        self.group = group if isinstance(group, zarr.Group) else zarr.open_group(str(group), mode="r")
        attrs = dict(self.group.attrs)
        if attrs.get("format") != "distpen.FactoredMajorizer":
            raise InvalidArgumentError(f"{group!r} does not hold a factored majorizer")
        from ..penalties import penalty_from_spec

        self.pairs = PairTable.open(_child_path(self.group, "pairs"), validate=False)
        self.penalty = penalty_from_spec(attrs["penalty"], self.pairs)
        self.rho = np.asarray(attrs["rho"], dtype=np.float64)
        self.scale = float(attrs["scale"])
        self.S = self.group["S"]
        self.beta = self.group["beta"]

    @classmethod
    def write(cls, group, pen, t_src, rho, scale) -> "FactoredMajorizer":
        n = pen.n_coef
        beta = group.create_array("beta", shape=(n,), chunks=(min(n, 1 << 20),), dtype="f8",
                                  fill_value=0.0, overwrite=True)
        if t_src.kind == "numpy":
            beta[:] = t_src.read_all() if not hasattr(t_src.payload, "result") else t_src.payload.result()
        else:
            import dask.array as da

            da.from_zarr(t_src.payload).astype("f8").reshape(-1).rechunk(beta.chunks).store(beta, lock=False)
        pen.pairs.save(_child_path(group, "pairs"))
        group.attrs.update({"format": "distpen.FactoredMajorizer", "penalty": pen.to_spec(),
                            "rho": [float(x) for x in rho], "scale": float(scale), "n": n})
        return cls(group)

    @property
    def shape(self) -> tuple[int, int]:
        n = self.penalty.n_coef
        return (n, n)

    def matvec(self, v, *, n_tasks: int | None = None) -> np.ndarray:
        """``scale·H_GN v`` (numpy in, numpy out), computed on the cluster."""
        client = _client()
        pen = self.penalty
        n = pen.n_coef
        v_src, _ = as_vector_source(v, n, "v", client=client)
        t_src = VectorSource("zarr", self.beta, n)
        threads = threads_per_task(client)
        n_threads = sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values())
        plan = DecoderPlan.balanced(pen, n_tasks or 4 * n_threads)
        futs = [client.submit(_owned_offdiag, part, t_src.meta(), None, v_src.meta(), v_src.task_payload(),
                              self.S, self.rho, self.scale, threads, pure=False) for part in plan.parts]
        out = [None] * len(futs)
        for idx, val in client.gather(futs):
            out[idx] = val
        return np.concatenate(out)


def _owned_offdiag(part: _Part, t_src, t_payload, v_src, v_payload, S_array, rho, scale, threads):
    """Worker task: a part's rows of ``scale·H_GN v`` from the stored ``s·S_a`` and the pairs."""
    with kernel_threads(threads):
        t_local = t_src.read_ranges(part.starts, part.lengths, t_payload)
        v_local = v_src.read_ranges(part.starts, part.lengths, v_payload)
        res = part.local.evaluate_owned(t_local, rho, ("psd_majorizer_offdiag_hvp",), v_local,
                                        out_atoms=part.out_atoms)
        lo, hi = part.out_atoms
        loff = part.local.layout.offsets
        g = part.atoms[lo:hi]
        S = np.asarray(S_array.oindex[g, :, :], dtype=np.float64)
        diag = part.local.layout.block_matmul(v_local[loff[lo]:loff[hi]], S, np.arange(lo, hi))
    a, b = part.trim
    return part.index, scale * (res["psd_majorizer_offdiag_hvp"] + diag)[a:b]
