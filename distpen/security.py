"""TLS for the connections between a distpen client, the Dask scheduler and the workers.

Everything goes through :class:`distributed.security.Security`:

* certificate files (a CA bundle, a certificate and its private key, PEM) — what a real cluster
  uses; the scheduler and workers are started with the same ``--tls-ca-file/--tls-cert/--tls-key``
  options (see ``deploy/README.md``);
* temporary self-signed certificates (:meth:`Security.temporary`, needs ``cryptography``) for an
  embedded ``LocalCluster``, or written to files by :func:`write_temporary_certificates` for a
  local ``dask scheduler`` / ``dask worker`` started by hand.

Dask's TLS is mutual: the scheduler refuses a client without a certificate signed by its CA, and
the client checks the scheduler's certificate against the same CA (host names are not checked).

Examples
--------
>>> sec = security_from_files("ca.pem", "cert.pem", "key.pem")     # doctest: +SKIP
>>> client = dp.connect("tls://scheduler:8786", security=sec)     # doctest: +SKIP
>>> client = dp.connect(security=True, n_workers=2)               # doctest: +SKIP
"""

from __future__ import annotations

import os

from .errors import InvalidArgumentError

__all__ = ["security_from_files", "temporary_security", "write_temporary_certificates",
           "resolve_security", "config_security"]

_TLS_FILES_HINT = ("pass all three of --tls-ca-file, --tls-cert and --tls-key (Python: "
                   "security_from_files(ca_file, cert, key)), the files the scheduler was started with")


def _check_file(path, name: str) -> str:
    if path is None:
        raise InvalidArgumentError(f"TLS needs {name}; {_TLS_FILES_HINT}")
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise InvalidArgumentError(f"TLS {name} {p!r} is not a file; {_TLS_FILES_HINT}")
    return p


def security_from_files(ca_file, cert, key):
    """A ``Security`` that requires TLS, for a client (and, equally, workers) of a TLS scheduler.

    Parameters
    ----------
    ca_file : path
        PEM bundle of the certificate authorities trusted to sign the scheduler's and workers'
        certificates.
    cert, key : path
        This process's certificate (signed by that CA) and its private key, PEM.

    Returns
    -------
    distributed.security.Security

    Raises
    ------
    InvalidArgumentError
        A file is missing.
    """
    from distributed.security import Security

    ca, c, k = _check_file(ca_file, "a CA file"), _check_file(cert, "a certificate"), _check_file(key, "a key")
    return Security(require_encryption=True, tls_ca_file=ca,
                    tls_client_cert=c, tls_client_key=k,
                    tls_scheduler_cert=c, tls_scheduler_key=k,
                    tls_worker_cert=c, tls_worker_key=k)


def temporary_security():
    """``Security.temporary()``: an in-memory self-signed certificate for every role (local use).

    Raises
    ------
    InvalidArgumentError
        ``cryptography`` is not installed.
    """
    from distributed.security import Security

    try:
        return Security.temporary()
    except ImportError as exc:
        raise InvalidArgumentError(
            f"temporary TLS certificates need the 'cryptography' package ({exc}); "
            "install it (pip install 'distpen[tls]') or pass certificate files"
        ) from None


def write_temporary_certificates(directory) -> dict:
    """Write a temporary self-signed certificate (its own CA) and key as PEM files in ``directory``.

    For local use only: a ``dask scheduler``/``dask worker`` started with
    ``--tls-ca-file ca.pem --tls-cert cert.pem --tls-key key.pem`` and a client given the same
    files. The key file is created with mode 0600.

    Returns
    -------
    dict
        ``{"ca_file": path, "cert": path, "key": path}``.
    """
    sec = temporary_security()
    d = os.fspath(directory)
    os.makedirs(d, exist_ok=True)
    paths = {"ca_file": os.path.join(d, "ca.pem"), "cert": os.path.join(d, "cert.pem"),
             "key": os.path.join(d, "key.pem")}
    for name, text, mode in (("ca_file", sec.tls_ca_file, 0o644), ("cert", sec.tls_client_cert, 0o644),
                             ("key", sec.tls_client_key, 0o600)):
        fd = os.open(paths[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(paths[name], mode)
    return paths


def config_security():
    """The ``Security`` of the Dask configuration (``distributed.comm.tls.*``), or None if it sets no
    client certificate."""
    from distributed.security import Security

    sec = Security()
    return sec if sec.tls_client_cert and sec.tls_ca_file else None


def resolve_security(tls: bool = False, ca_file=None, cert=None, key=None, *, address=None):
    """The ``Security`` the command-line options ask for, or None for plain TCP.

    * any of ``ca_file``, ``cert``, ``key``: all three are needed (mutual TLS);
    * ``tls`` alone with a scheduler ``address``: the Dask configuration's certificates
      (``DASK_DISTRIBUTED__COMM__TLS__CA_FILE`` ...), an error if it has none;
    * ``tls`` alone without an address: ``True``, i.e. temporary certificates for the embedded cluster.
    """
    if ca_file is not None or cert is not None or key is not None:
        return security_from_files(ca_file, cert, key)
    if not tls:
        return None
    if address:
        sec = config_security()
        if sec is None:
            raise InvalidArgumentError(
                f"--tls with scheduler {address!r} needs the cluster's certificates; {_TLS_FILES_HINT}, "
                "or set them in the Dask configuration (distributed.comm.tls.ca-file, "
                "distributed.comm.tls.client.cert, distributed.comm.tls.client.key)"
            )
        return sec
    return True


def _main(argv=None) -> int:
    """``python -m distpen.security DIR``: write temporary self-signed certificates into DIR."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m distpen.security",
                                     description="write a temporary self-signed TLS certificate "
                                                 "(ca.pem, cert.pem, key.pem) for a local Dask cluster")
    parser.add_argument("directory")
    args = parser.parse_args(argv)
    paths = write_temporary_certificates(args.directory)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
