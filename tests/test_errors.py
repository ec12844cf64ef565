"""Error messages on bad input: the class, the argument's name, the value, the expectation.

One test per bad input. Every check names the specific ``distpen.errors`` class and matches the
message. Numbers in messages are matched with :func:`_num`, which also accepts the numpy-2 repr
``np.float64(x)``; whether that repr leaks into messages at all is checked once, in
``test_messages_show_plain_numbers``.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import distpen as dp
from distpen.errors import (DistpenError, InvalidArgumentError, InvalidDtypeError, PairTableError,
                            ScheduleError, ShapeMismatchError)


def _num(x) -> str:
    """Regex for the number ``x`` as printed in a message (``1.5`` or ``np.float64(1.5)``)."""
    return rf"(np\.float64\()?{re.escape(repr(float(x)))}\)?"


# two atoms of 1 and 2 rows, p_out 2: 6 coefficients
SIZES = [1, 2]
P_OUT = 2
N_COEF = 6


def _dec(learnable=False, weight=1.0):
    return dp.DecoderIncoherencePenalty.from_pairs(([0], [1], [1.0]), SIZES, P_OUT, weight,
                                                   learnable_weight=learnable)


def _nest():
    return dp.NestedPrefixPenalty([1, 3], [1.0, 0.5], eps=0.1)  # F = 3, rho_count = 2


T_DEC = np.arange(1.0, N_COEF + 1)
T_NEST = np.arange(1.0, 7.0)


# --------------------------------------------------------------------------- hierarchy


def test_error_classes_subclass_builtins():
    assert issubclass(InvalidArgumentError, ValueError) and issubclass(InvalidArgumentError, DistpenError)
    assert issubclass(ShapeMismatchError, InvalidArgumentError)
    assert issubclass(PairTableError, InvalidArgumentError)
    assert issubclass(ScheduleError, InvalidArgumentError)
    assert issubclass(InvalidDtypeError, TypeError) and issubclass(InvalidDtypeError, DistpenError)


# --------------------------------------------------------------------------- empty target


def test_empty_target_decoder():
    with pytest.raises(InvalidArgumentError, match=r"t is empty; expected 6 coefficients"):
        _dec().value(np.zeros(0))


def test_empty_target_nested():
    with pytest.raises(InvalidArgumentError, match=r"t is empty; expected n_rows × latent_dim"):
        _nest().grad_target(np.zeros(0), np.zeros(2))


# --------------------------------------------------------------------------- decoder weight


@pytest.mark.parametrize("learnable", [False, True])
@pytest.mark.parametrize("weight", [0.0, -1.0, -1e-300])
def test_weight_not_positive(weight, learnable):
    with pytest.raises(InvalidArgumentError, match=rf"weight must be > 0, got {_num(weight)}"):
        _dec(learnable, weight)


@pytest.mark.parametrize("learnable", [False, True])
@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf])
def test_weight_not_finite(weight, learnable):
    with pytest.raises(InvalidArgumentError, match=rf"weight must be finite, got {_num(weight)}"):
        _dec(learnable, weight)


def test_weight_not_positive_from_coactivation():
    with pytest.raises(InvalidArgumentError, match=r"weight must be > 0, got 0\.0"):
        dp.DecoderIncoherencePenalty.from_coactivation(np.ones((2, 2)), SIZES, P_OUT, 0.0)


def test_weight_not_a_number():
    with pytest.raises(InvalidArgumentError, match=r"weight must be a real number, got '1'"):
        _dec(weight="1")


def test_learnable_weight_not_bool():
    with pytest.raises(InvalidArgumentError, match=r"learnable_weight must be a bool, got 1"):
        dp.DecoderIncoherencePenalty.from_pairs(([0], [1], [1.0]), SIZES, P_OUT, 1.0, learnable_weight=1)


# --------------------------------------------------------------------------- layout


def test_p_out_zero():
    with pytest.raises(InvalidArgumentError, match=r"p_out must be > 0, got 0"):
        dp.DecoderIncoherencePenalty.from_pairs(([0], [1], [1.0]), SIZES, 0, 1.0)


def test_p_out_negative():
    with pytest.raises(InvalidArgumentError, match=r"p_out must be > 0, got -3"):
        dp.DecoderLayout(SIZES, -3)


def test_p_out_not_integer():
    with pytest.raises(InvalidArgumentError, match=r"p_out must be an integer, got 2\.5"):
        dp.DecoderLayout(SIZES, 2.5)


@pytest.mark.parametrize("sizes, got", [([3], 1), ([], 0)])
def test_fewer_than_two_blocks(sizes, got):
    with pytest.raises(InvalidArgumentError, match=rf"block_sizes must describe at least two atoms.*got {got}"):
        dp.DecoderIncoherencePenalty.from_coactivation(np.zeros((max(len(sizes), 1),) * 2), sizes, P_OUT, 1.0)


def test_block_size_zero():
    with pytest.raises(InvalidArgumentError, match=r"block_sizes must all be ≥ 1, but block_sizes\[1\] = 0"):
        dp.DecoderIncoherencePenalty.from_pairs(([0], [2], [1.0]), [1, 0, 2], P_OUT, 1.0)


def test_block_size_negative():
    with pytest.raises(InvalidArgumentError, match=r"block_sizes must all be ≥ 1, but block_sizes\[0\] = -1"):
        dp.DecoderLayout([-1, 2], P_OUT)


@pytest.mark.parametrize("n", [5, 7, 12])
def test_target_length_mismatch(n):
    with pytest.raises(ShapeMismatchError,
                       match=rf"block_sizes sum to 3 rows × p_out 2 = 6 coefficients, but t has {n}; pass"):
        _dec().grad_target(np.ones(n))


def test_target_2d():
    with pytest.raises(ShapeMismatchError, match=r"t must be 1-D, got array of shape \(2, 3\)"):
        _dec().value(np.ones((2, 3)))


def test_target_non_finite():
    t = T_DEC.copy()
    t[4] = np.nan
    with pytest.raises(InvalidArgumentError, match=rf"t must be finite, but t\[4\] = {_num(np.nan)}"):
        _dec().value(t)


# --------------------------------------------------------------------------- coactivation


@pytest.mark.parametrize("shape", [(2, 3), (3, 3), (2,), (2, 2, 1)])
def test_coactivation_not_k_by_k(shape):
    with pytest.raises(ShapeMismatchError, match=rf"coactivation must be K × K = 2 × 2 for 2 blocks, "
                                                 rf"got shape {re.escape(str(shape))}"):
        dp.DecoderIncoherencePenalty.from_coactivation(np.ones(shape), SIZES, P_OUT, 1.0)


def test_from_dense_not_square():
    with pytest.raises(ShapeMismatchError, match=r"coactivation must be a square K × K matrix, got array of shape \(2, 3\)"):
        dp.PairTable.from_dense(np.ones((2, 3)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_coactivation_non_finite(bad):
    C = np.ones((2, 2))
    C[1, 0] = bad
    with pytest.raises(InvalidArgumentError, match=rf"coactivation must be finite, but C\[1, 0\] = {_num(bad)}"):
        dp.DecoderIncoherencePenalty.from_coactivation(C, SIZES, P_OUT, 1.0)


def test_coactivation_negative():
    C = np.ones((2, 2))
    C[0, 1] = -0.25
    with pytest.raises(InvalidArgumentError, match=rf"coactivation must be ≥ 0, but C\[0, 1\] = {_num(-0.25)}"):
        dp.DecoderIncoherencePenalty.from_coactivation(C, SIZES, P_OUT, 1.0)


def test_coactivation_negative_on_diagonal_also_refused():
    C = np.ones((2, 2))
    C[1, 1] = -1.0
    with pytest.raises(InvalidArgumentError, match=r"coactivation must be ≥ 0, but C\[1, 1\]"):
        dp.PairTable.from_dense(C)


def test_coactivation_complex():
    with pytest.raises(InvalidDtypeError, match=r"coactivation has dtype complex128"):
        dp.DecoderIncoherencePenalty.from_coactivation(np.ones((2, 2), dtype=complex), SIZES, P_OUT, 1.0)


# --------------------------------------------------------------------------- pairs


@pytest.mark.parametrize("j, k", [([0], [3]), ([-1], [1]), ([0, 1], [1, 5])])
def test_pair_out_of_range(j, k):
    q = len(j) - 1
    with pytest.raises(PairTableError,
                       match=rf"pair {q} = \({j[q]}, {k[q]}\) is out of range; atom indices must be in \[0, 3\)"):
        dp.PairTable(j, k, [1.0] * len(j), k_atoms=3)


@pytest.mark.parametrize("j, k", [(1, 1), (2, 0)])
def test_pair_j_not_less_than_k(j, k):
    with pytest.raises(PairTableError, match=rf"pair 0 = \({j}, {k}\) has j ≥ k; list each pair once with j < k"):
        dp.PairTable([j], [k], [1.0], k_atoms=3)


def test_pair_duplicated():
    with pytest.raises(PairTableError, match=r"pair \(0, 2\) appears more than once"):
        dp.PairTable([0, 1, 0], [2, 2, 2], [1.0, 1.0, 0.5], k_atoms=3)


@pytest.mark.parametrize("w", [np.nan, np.inf, -np.inf])
def test_pair_weight_non_finite(w):
    with pytest.raises(PairTableError, match=rf"pair 1 = \(1, 2\) has weight {_num(w)}; weights must be finite and ≥ 0"):
        dp.PairTable([0, 1], [1, 2], [1.0, w], k_atoms=3)


def test_pair_weight_negative():
    with pytest.raises(PairTableError, match=rf"pair 0 = \(0, 1\) has weight {_num(-2.0)}; weights must be finite and ≥ 0"):
        dp.PairTable([0], [1], [-2.0], k_atoms=3)


def test_pair_errors_through_from_pairs():
    with pytest.raises(PairTableError, match=r"pair 0 = \(0, 2\) is out of range; atom indices must be in \[0, 2\)"):
        dp.DecoderIncoherencePenalty.from_pairs(([0], [2], [1.0]), SIZES, P_OUT, 1.0)


def test_pair_columns_length_mismatch():
    with pytest.raises(ShapeMismatchError, match=r"pairs j, k and w must have the same length, got 2, 1, 1"):
        dp.PairTable([0, 1], [2], [1.0], k_atoms=3)


def test_pair_indices_not_integers():
    with pytest.raises(InvalidDtypeError, match=r"pairs j must hold integers"):
        dp.PairTable([0.5], [1], [1.0], k_atoms=3)


def test_pair_weight_complex():
    with pytest.raises(InvalidDtypeError, match=r"pairs w has dtype complex128"):
        dp.PairTable([0], [1], np.array([1.0 + 1j]), k_atoms=3)


def test_pairs_k_atoms_mismatch():
    pt = dp.PairTable([0], [1], [1.0], k_atoms=3)
    with pytest.raises(ShapeMismatchError, match=r"pairs index k_atoms = 3 atoms but block_sizes describe 2"):
        dp.DecoderIncoherencePenalty.from_pairs(pt, SIZES, P_OUT, 1.0)


def test_pairs_wrong_type():
    with pytest.raises(InvalidArgumentError, match=r"pairs must be a PairTable or a \(j, k, w\) triple.*got str"):
        dp.DecoderIncoherencePenalty.from_pairs("pairs", SIZES, P_OUT, 1.0)
    with pytest.raises(InvalidArgumentError, match=r"pairs must be a PairTable, got list"):
        dp.DecoderIncoherencePenalty([[0], [1], [1.0]], SIZES, P_OUT, 1.0)


def test_k_atoms_zero():
    with pytest.raises(InvalidArgumentError, match=r"k_atoms must be > 0, got 0"):
        dp.PairTable([], [], [], k_atoms=0)


# --------------------------------------------------------------------------- prefixes


def test_prefixes_empty():
    with pytest.raises(InvalidArgumentError, match=r"prefix_sizes is empty; expected at least one prefix size"):
        dp.NestedPrefixPenalty([], [], eps=0.1)


@pytest.mark.parametrize("prefix, bad", [([3, 1], "prefix_sizes\\[0\\] = 3 ≥ prefix_sizes\\[1\\] = 1"),
                                         ([1, 2, 2], "prefix_sizes\\[1\\] = 2 ≥ prefix_sizes\\[2\\] = 2")])
def test_prefixes_unsorted_or_repeated(prefix, bad):
    with pytest.raises(InvalidArgumentError, match=rf"prefix_sizes must be strictly increasing, but {bad}"):
        dp.NestedPrefixPenalty(prefix, [1.0] * len(prefix), eps=0.1)


@pytest.mark.parametrize("prefix, q, v", [([0, 2], 0, 0), ([-1, 2], 0, -1)])
def test_prefixes_zero_or_negative(prefix, q, v):
    with pytest.raises(InvalidArgumentError, match=rf"prefix_sizes must be > 0, but prefix_sizes\[{q}\] = {v}"):
        dp.NestedPrefixPenalty(prefix, [1.0, 1.0], eps=0.1)


def test_prefixes_too_large():
    with pytest.raises(InvalidArgumentError, match=r"prefix_sizes reach 5, beyond latent_dim = 4"):
        dp.NestedPrefixPenalty([2, 5], [1.0, 1.0], eps=0.1, latent_dim=4)


def test_prefixes_not_integers():
    with pytest.raises(InvalidDtypeError, match=r"prefix_sizes must hold integers"):
        dp.NestedPrefixPenalty([1.5, 2], [1.0, 1.0], eps=0.1)


def test_latent_dim_zero():
    with pytest.raises(InvalidArgumentError, match=r"latent_dim must be > 0, got 0"):
        dp.NestedPrefixPenalty([1], [1.0], eps=0.1, latent_dim=0)


# --------------------------------------------------------------------------- shell weights, eps


@pytest.mark.parametrize("weights", [[1.0], [1.0, 1.0, 1.0]])
def test_shell_weights_wrong_length(weights):
    with pytest.raises(ShapeMismatchError,
                       match=rf"shell_weights has length {len(weights)}, expected 2 \(one weight per prefix\)"):
        dp.NestedPrefixPenalty([1, 2], weights, eps=0.1)


def test_shell_weights_negative():
    with pytest.raises(InvalidArgumentError, match=rf"shell_weights must be ≥ 0, but shell_weights\[1\] = {_num(-0.5)}"):
        dp.NestedPrefixPenalty([1, 2], [1.0, -0.5], eps=0.1)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_shell_weights_non_finite(bad):
    with pytest.raises(InvalidArgumentError, match=rf"shell_weights must be finite, but shell_weights\[0\] = {_num(bad)}"):
        dp.NestedPrefixPenalty([1, 2], [bad, 1.0], eps=0.1)


@pytest.mark.parametrize("eps", [0.0, -0.1, -math.inf])
def test_eps_not_positive(eps):
    msg = rf"eps must be finite, got {_num(eps)}" if math.isinf(eps) else rf"eps must be > 0, got {_num(eps)}"
    with pytest.raises(InvalidArgumentError, match=msg):
        dp.NestedPrefixPenalty([1, 2], [1.0, 1.0], eps=eps)


@pytest.mark.parametrize("eps", [math.nan, math.inf])
def test_eps_not_finite(eps):
    with pytest.raises(InvalidArgumentError, match=rf"eps must be finite, got {_num(eps)}"):
        dp.NestedPrefixPenalty([1, 2], [1.0, 1.0], eps=eps)


def test_tier_invalid():
    with pytest.raises(InvalidArgumentError, match=r"tier must be one of \['BETA', 'PSI', 'RHO'\], got 'gamma'"):
        dp.NestedPrefixPenalty([1, 2], [1.0, 1.0], eps=0.1, tier="gamma")


@pytest.mark.parametrize("n", [1, 4, 7])
def test_target_not_multiple_of_latent_dim(n):
    with pytest.raises(ShapeMismatchError,
                       match=rf"len\(t\) = {n} is not a multiple of latent_dim = 3; the target is n_rows × latent_dim"):
        _nest().value(np.ones(n), np.zeros(2))


# --------------------------------------------------------------------------- rho


@pytest.mark.parametrize("make, rho, expected", [
    (lambda: _dec(False), [0.0], 0),
    (lambda: _dec(True), [], 1),
    (lambda: _dec(True), [0.0, 0.0], 1),
    (_nest, [0.0], 2),
    (_nest, [0.0, 0.0, 0.0], 2),
])
def test_rho_wrong_length(make, rho, expected):
    pen = make()
    t = T_NEST if isinstance(pen, dp.NestedPrefixPenalty) else T_DEC
    name = type(pen).__name__
    with pytest.raises(ShapeMismatchError,
                       match=rf"rho has length {len(rho)}, expected {expected} \({name} takes its own ρ slice"):
        pen.value(t, np.array(rho))


def test_rho_missing_when_learnable():
    with pytest.raises(ShapeMismatchError, match=r"rho has length 0, expected 1"):
        _dec(True).grad_target(T_DEC)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_rho_non_finite(bad):
    with pytest.raises(InvalidArgumentError, match=rf"rho must be finite, but rho\[1\] = {_num(bad)}"):
        _nest().grad_rho(T_NEST, np.array([0.0, bad]))
    with pytest.raises(InvalidArgumentError, match=rf"rho must be finite, but rho\[0\] = {_num(bad)}"):
        _dec(True).value(T_DEC, np.array([bad]))


def test_rho_not_1d():
    with pytest.raises(ShapeMismatchError, match=r"rho must be 1-D"):
        _dec(True).value(T_DEC, 0.5)


# --------------------------------------------------------------------------- probe v


@pytest.mark.parametrize("op", ["hvp", "psd_majorizer_hvp"])
@pytest.mark.parametrize("which", ["dec", "nest"])
def test_v_wrong_length(op, which):
    pen, t, rho = (_dec(), T_DEC, None) if which == "dec" else (_nest(), T_NEST, np.zeros(2))
    with pytest.raises(ShapeMismatchError, match=rf"v has length 5, expected {t.shape[0]} \(the same length as t\)"):
        getattr(pen, op)(t, rho, np.ones(5))


@pytest.mark.parametrize("op", ["hvp", "psd_majorizer_hvp"])
@pytest.mark.parametrize("which", ["dec", "nest"])
def test_v_missing(op, which):
    pen, t, rho = (_dec(), T_DEC, None) if which == "dec" else (_nest(), T_NEST, np.zeros(2))
    with pytest.raises(InvalidArgumentError, match=rf"v is required: pass a probe vector of length {t.shape[0]}"):
        getattr(pen, op)(t, rho, None)


def test_v_non_finite():
    v = np.ones(N_COEF)
    v[2] = np.inf
    with pytest.raises(InvalidArgumentError, match=rf"v must be finite, but v\[2\] = {_num(np.inf)}"):
        _dec().hvp(T_DEC, None, v)


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.5, 1.5])
def test_geometric_rate_outside_unit_interval(rate):
    with pytest.raises(ScheduleError, match=rf"Geometric.rate must be in \(0, 1\), got {_num(rate)}"):
        dp.Geometric(rate)


@pytest.mark.parametrize("rate", [math.nan, math.inf])
def test_geometric_rate_non_finite(rate):
    with pytest.raises(ScheduleError, match=rf"Geometric.rate must be finite, got {_num(rate)}"):
        dp.Geometric(rate)


@pytest.mark.parametrize("steps", [0, -3])
def test_linear_steps_not_positive(steps):
    with pytest.raises(ScheduleError, match=rf"Linear.steps must be > 0, got {steps}"):
        dp.Linear(steps)


def test_linear_steps_not_integer():
    with pytest.raises(ScheduleError, match=r"Linear.steps must be an integer, got 2\.5"):
        dp.Linear(2.5)


@pytest.mark.parametrize("arg, value", [("w_start", -1.0), ("w_end", -0.5)])
def test_schedule_weight_negative(arg, value):
    kw = {"w_start": 1.0, "w_end": 1.0, arg: value}
    with pytest.raises(ScheduleError, match=rf"{arg} must be ≥ 0, got {_num(value)}"):
        dp.ScalarWeightSchedule(kw["w_start"], kw["w_end"], dp.ReciprocalIter())


@pytest.mark.parametrize("arg, value", [("w_start", math.nan), ("w_end", math.inf)])
def test_schedule_weight_non_finite(arg, value):
    kw = {"w_start": 1.0, "w_end": 1.0, arg: value}
    with pytest.raises(ScheduleError, match=rf"{arg} must be finite, got {_num(value)}"):
        dp.ScalarWeightSchedule(kw["w_start"], kw["w_end"], dp.Linear(3))


@pytest.mark.parametrize("kind", ["linear", None, dp.Linear, 0.5])
def test_schedule_bad_kind(kind):
    with pytest.raises(ScheduleError,
                       match=rf"kind must be Geometric\(rate\), Linear\(steps\) or ReciprocalIter\(\), got {re.escape(repr(kind))}"):
        dp.ScalarWeightSchedule(1.0, 0.0, kind)


def test_schedule_spec_unknown_kind():
    with pytest.raises(ScheduleError, match=r"unknown schedule kind in spec: \{'kind': 'cosine'\}"):
        dp.ScalarWeightSchedule.from_spec({"w_start": 1.0, "w_end": 0.0, "kind": {"kind": "cosine"}})


def _scheduled(which):
    s = dp.ScalarWeightSchedule(1.0, 0.5, dp.Geometric(0.5))
    return (_dec() if which == "dec" else _nest()).with_weight_schedule(s)


@pytest.mark.parametrize("which", ["dec", "nest"])
@pytest.mark.parametrize("it", [1_000_000, 5_000_000])
def test_apply_schedule_implausible_iteration(which, it):
    pen = _scheduled(which)
    before = pen.to_spec()
    with pytest.raises(ScheduleError, match=rf"it = {it} is implausible \(≥ 1,000,000\); the iteration counter looks corrupted"):
        pen.apply_schedule(it)
    assert pen.to_spec() == before  # nothing changed


@pytest.mark.parametrize("which", ["dec", "nest"])
def test_apply_schedule_negative_iteration(which):
    pen = _scheduled(which)
    with pytest.raises(ScheduleError, match=r"it must be ≥ 0, got -1"):
        pen.apply_schedule(-1)


def test_apply_schedule_non_integer_iteration():
    with pytest.raises(ScheduleError, match=r"it must be a non-negative integer, got 2\.0"):
        _scheduled("nest").apply_schedule(2.0)


def test_with_weight_schedule_not_a_schedule():
    with pytest.raises(ScheduleError, match=r"schedule must be a ScalarWeightSchedule, got 0\.5"):
        _nest().with_weight_schedule(0.5)


# --------------------------------------------------------------------------- resolve_learnable_weight


def test_resolve_base_non_finite():
    with pytest.raises(InvalidArgumentError, match=r"base must be finite, got nan"):
        dp.resolve_learnable_weight(math.nan, 0.0)


def test_resolve_rho_non_finite():
    with pytest.raises(InvalidArgumentError, match=r"rho must be finite, got inf"):
        dp.resolve_learnable_weight(1.0, math.inf)


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [np.complex128, np.complex64, object, "U3"])
def test_target_dtype_refused(dtype):
    t = T_DEC.astype(dtype)
    with pytest.raises(InvalidDtypeError, match=rf"t has dtype {re.escape(str(np.dtype(dtype)))}; expected a real float64 array"):
        _dec().value(t)


def test_rho_complex_refused():
    with pytest.raises(InvalidDtypeError, match=r"rho has dtype complex128"):
        _dec(True).value(T_DEC, np.array([0.0 + 0j]))


def test_v_complex_refused():
    with pytest.raises(InvalidDtypeError, match=r"v has dtype complex128"):
        _nest().hvp(T_NEST, np.zeros(2), T_NEST + 0j)


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_int64_beyond_2_53_refused(dtype):
    t = np.ones(N_COEF, dtype=dtype)
    t[3] = 2**54
    with pytest.raises(InvalidDtypeError, match=r"t holds the integer 18014398509481984, beyond 2\*\*53"):
        _dec().value(t)


def test_int64_just_beyond_2_53_refused():
    # 2**53 + 1 rounds to 2**53 in float64: checking the *converted* values misses it and the
    # input is silently truncated
    for value in (2**53 + 1, -(2**53) - 1):
        t = np.ones(N_COEF, dtype=np.int64)
        t[0] = value
        with pytest.raises(InvalidDtypeError, match=r"beyond 2\*\*53"):
            _dec().value(t)


def test_int64_up_to_2_53_converted_exactly():
    t = np.ones(N_COEF, dtype=np.int64)
    t[0] = 2**53
    g = _dec().grad_target(t)
    assert g.dtype == np.float64
    assert _dec().value(t) == _dec().value(t.astype(np.float64))


@pytest.mark.skipif(np.dtype(np.longdouble).itemsize <= 8, reason="longdouble is float64 here")
def test_longdouble_refused():
    with pytest.raises(InvalidDtypeError, match=r"t has dtype float128, which float64 cannot hold exactly"):
        _dec().value(T_DEC.astype(np.longdouble))


def test_float32_and_small_ints_converted():
    pen = _dec()
    ref = pen.value(T_DEC)
    assert pen.value(T_DEC.astype(np.float32)) == ref
    assert pen.value(T_DEC.astype(np.int32)) == ref
    assert pen.value(T_DEC.astype(np.int64)) == ref
    assert pen.value(T_DEC.astype(np.float16)) == ref


# --------------------------------------------------------------------------- dense accumulation


@pytest.mark.parametrize("shape", [(5, 5), (6, 7), (36,)])
def test_dense_out_wrong_shape(shape):
    with pytest.raises(ShapeMismatchError,
                       match=rf"out has shape {re.escape(str(shape))}, expected \(6, 6\) for len\(t\) = 6"):
        _dec().accumulate_psd_majorizer_dense(T_DEC, None, 1.0, np.zeros(shape))


@pytest.mark.parametrize("dtype", [np.float32, np.complex128, np.int64])
def test_dense_out_wrong_dtype(dtype):
    out = np.zeros((N_COEF, N_COEF), dtype=dtype)
    with pytest.raises(InvalidDtypeError, match=rf"out has dtype {np.dtype(dtype)}; expected float64"):
        _dec().accumulate_psd_majorizer_dense(T_DEC, None, 1.0, out)
    assert (out == 0).all()


def test_dense_out_not_c_contiguous():
    with pytest.raises(InvalidArgumentError, match=r"c_contiguous=False"):
        _dec().accumulate_psd_majorizer_dense(T_DEC, None, 1.0, np.zeros((N_COEF, N_COEF), order="F"))


def test_dense_out_read_only():
    out = np.zeros((N_COEF, N_COEF))
    out.setflags(write=False)
    with pytest.raises(InvalidArgumentError, match=r"writeable=False"):
        _dec().accumulate_psd_majorizer_dense(T_DEC, None, 1.0, out)


def test_dense_out_not_an_array():
    with pytest.raises(InvalidArgumentError, match=r"out must be a numpy array of shape \(6, 6\), got list"):
        _dec().accumulate_psd_majorizer_dense(T_DEC, None, 1.0, [[0.0] * 6] * 6)


def test_dense_scale_non_finite():
    with pytest.raises(InvalidArgumentError, match=r"scale must be finite, got nan"):
        _dec().accumulate_psd_majorizer_dense(T_DEC, None, math.nan, np.zeros((N_COEF, N_COEF)))


# --------------------------------------------------------------------------- message hygiene


def _messages():
    """Messages of a sample of bad calls whose message carries a float taken from an array."""
    calls = [
        lambda: _dec().value(np.array([1.0, 2, 3, 4, np.nan, 6])),
        lambda: _nest().value(T_NEST, np.array([0.0, np.inf])),
        lambda: dp.PairTable([0], [1], [-2.0], 3),
        lambda: dp.PairTable([0], [1], [np.nan], 3),
        lambda: dp.PairTable.from_dense(np.array([[0.0, -1.0], [0.0, 0.0]])),
        lambda: dp.PairTable.from_dense(np.array([[0.0, np.nan], [0.0, 0.0]])),
        lambda: dp.NestedPrefixPenalty([1, 2], [1.0, -0.5], eps=0.1),
        lambda: dp.NestedPrefixPenalty([1, 2], [np.nan, 1.0], eps=0.1),
    ]
    out = []
    for call in calls:
        with pytest.raises(DistpenError) as info:
            call()
        out.append(str(info.value))
    return out


def test_messages_show_plain_numbers():
    # numpy ≥ 2 reprs scalars as "np.float64(-2.0)"; a user-facing message should say "-2.0"
    bad = [m for m in _messages() if "np.float64(" in m or "np.int64(" in m]
    assert not bad, "messages leak numpy scalar reprs:\n" + "\n".join(bad)
