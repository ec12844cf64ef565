"""distpen.weights: resolve_learnable_weight and ScalarWeightSchedule (docs/design.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _reference import ref_resolve

import distpen as dp
from distpen.errors import InvalidArgumentError, ScheduleError

# --------------------------------------------------------------------------- resolve_learnable_weight


@pytest.mark.parametrize(
    "base, rho, expected",
    [
        (2.0, 0.0, 2.0),
        (2.0, math.log(3.0), 6.0),
        (-2.0, 1.0, -2.0 * math.e),
        (0.5, -math.log(2.0), 0.25),
        (-0.5, -math.log(2.0), -0.25),
    ],
)
def test_resolve_learnable_weight_values(base, rho, expected):
    got = dp.resolve_learnable_weight(base, rho)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("rho", [0.0, 1.0, -1.0, 1000.0, -1000.0, 1e308, -1e308])
def test_resolve_zero_base_is_zero(rho):
    assert dp.resolve_learnable_weight(0.0, rho) == 0.0
    assert dp.resolve_learnable_weight(-0.0, rho) == 0.0


@pytest.mark.parametrize("base", [1.0, 3.5, 1e-300, 1e300, -1.0, -7.25, -1e-300])
@pytest.mark.parametrize("rho", [1000.0, -1000.0, 1e308, -1e308])
def test_resolve_clamp_finite_nonzero_sign_kept(base, rho):
    w = dp.resolve_learnable_weight(base, rho)
    assert math.isfinite(w)
    assert w != 0.0
    assert math.copysign(1.0, w) == math.copysign(1.0, base)
    assert math.exp(-700.0) <= abs(w) <= math.exp(700.0)
    assert w == pytest.approx(ref_resolve(base, rho), rel=1e-13)
    if abs(rho) > 1e3 or abs(base) in (1.0, 3.5, 7.25):
        # ln|base| + rho is far outside ±700: the clamp is active
        expected = math.exp(700.0) if rho > 0 else math.exp(-700.0)
        assert abs(w) == pytest.approx(expected, rel=1e-14)


def test_resolve_clamp_boundary_is_exact():
    assert dp.resolve_learnable_weight(1.0, 1000.0) == math.exp(700.0)
    assert dp.resolve_learnable_weight(1.0, -1000.0) == math.exp(-700.0)
    # just inside the clamp the plain formula applies
    assert dp.resolve_learnable_weight(1.0, 699.0) == pytest.approx(math.exp(699.0), rel=1e-14)
    assert dp.resolve_learnable_weight(math.e, 699.0) == pytest.approx(math.exp(700.0), rel=1e-13)


def test_resolve_matches_reference_on_random_values():
    rng = np.random.default_rng(0)
    bases = rng.standard_normal(200) * 10.0 ** rng.integers(-5, 5, size=200)
    rhos = rng.uniform(-800, 800, size=200)
    for b, r in zip(bases, rhos):
        assert dp.resolve_learnable_weight(b, r) == pytest.approx(ref_resolve(b, r), rel=1e-13)


def test_resolve_accepts_numpy_scalars():
    assert dp.resolve_learnable_weight(np.float64(2.0), np.float32(0.0)) == 2.0
    assert dp.resolve_learnable_weight(np.int64(3), 0) == pytest.approx(3.0, rel=1e-15)


# --------------------------------------------------------------------------- schedules: tables

TABLES = [
    # (w_start, w_end, kind, [w(0), w(1), ...])   hand-computed from docs/design.md
    (1.0, 3.0, dp.Geometric(0.5), [1.0, 2.0, 2.5, 2.75, 2.875]),  # 3 − 2·0.5^it
    (4.0, 0.0, dp.Geometric(0.25), [4.0, 1.0, 0.25, 0.0625, 0.015625]),  # 0 + 4·0.25^it
    (0.0, 2.0, dp.Linear(4), [0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0]),
    (3.0, 0.0, dp.Linear(3), [3.0, 2.0, 1.0, 0.0, 0.0]),
    (5.0, 7.0, dp.Linear(1), [5.0, 7.0, 7.0]),
    (1.0, 3.0, dp.ReciprocalIter(), [1.0, 2.0, 3.0 - 2.0 / 3.0, 2.5, 2.6]),  # 3 − 2/(1+it)
    (2.0, 0.0, dp.ReciprocalIter(), [2.0, 1.0, 2.0 / 3.0, 0.5, 0.4]),  # 0 + 2/(1+it)
    (1.5, 1.5, dp.Geometric(0.9), [1.5, 1.5, 1.5]),
    (1.5, 1.5, dp.ReciprocalIter(), [1.5, 1.5, 1.5]),
]


@pytest.mark.parametrize("w_start, w_end, kind, table", TABLES)
def test_schedule_current_weight_table(w_start, w_end, kind, table):
    s = dp.ScalarWeightSchedule(w_start, w_end, kind)
    got = [s.current_weight(it) for it in range(len(table))]
    np.testing.assert_allclose(got, table, rtol=1e-15, atol=0)
    assert s.iter_count == 0  # current_weight does not advance the counter


@pytest.mark.parametrize("w_start, w_end, kind, table", TABLES)
def test_schedule_step_returns_then_increments(w_start, w_end, kind, table):
    s = dp.ScalarWeightSchedule(w_start, w_end, kind)
    assert s.iter_count == 0
    for it, expected in enumerate(table):
        assert s.iter_count == it
        assert s.step() == pytest.approx(expected, rel=1e-15, abs=0)
        assert s.iter_count == it + 1


@pytest.mark.parametrize("kind", [dp.Geometric(0.5), dp.ReciprocalIter(), dp.Geometric(0.999)])
@pytest.mark.parametrize("w_start, w_end", [(0.1, 0.7), (0.7, 0.1), (0.1, 0.3), (1e-8, 3.0)])
def test_schedule_starts_exactly_at_w_start(kind, w_start, w_end):
    # 0.7 − (0.7 − 0.1) = 0.09999999999999998 in float64: only the clamp gives back w_start
    s = dp.ScalarWeightSchedule(w_start, w_end, kind)
    assert s.current_weight(0) == w_start


def test_schedule_start_exact_when_w_end_much_larger():
    # w_end − (w_end − w_start) can also round *up*, inside the clamp interval, when w_end ≫ w_start:
    # 1e6 − (1e6 − 0.3) = 0.30000000004656613. A schedule must start at w_start (and Linear does).
    bad = []
    for kind in (dp.Geometric(0.5), dp.ReciprocalIter(), dp.Geometric(0.999)):
        for w_start, w_end in [(0.3, 1e6), (1.017424013436539, 262146.0)]:
            got = dp.ScalarWeightSchedule(w_start, w_end, kind).current_weight(0)
            if got != w_start:
                bad.append(f"{kind!r} {w_start} → {w_end}: current_weight(0) = {got!r}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("kind", [dp.Geometric(0.3), dp.Linear(7), dp.ReciprocalIter(), dp.Geometric(0.99)])
@pytest.mark.parametrize("w_start, w_end", [(0.1, 0.7), (0.7, 0.1), (0.0, 1e-3), (3.3, 1e-9)])
def test_schedule_clamped_and_monotone(kind, w_start, w_end):
    s = dp.ScalarWeightSchedule(w_start, w_end, kind)
    lo, hi = min(w_start, w_end), max(w_start, w_end)
    its = list(range(0, 60)) + [100, 1000, 10_000, 999_999]
    ws = np.array([s.current_weight(it) for it in its])
    assert (ws >= lo).all() and (ws <= hi).all()
    d = np.diff(ws)
    if w_end > w_start:
        assert (d >= 0).all()
    else:
        assert (d <= 0).all()


def test_schedule_geometric_reaches_w_end_exactly():
    s = dp.ScalarWeightSchedule(2.0, 0.5, dp.Geometric(0.5))
    assert s.current_weight(999_999) == 0.5  # 0.5**999999 underflows to 0


def test_schedule_linear_constant_after_steps():
    s = dp.ScalarWeightSchedule(0.25, 1.25, dp.Linear(10))
    assert s.current_weight(9) == pytest.approx(0.25 + 0.9, rel=1e-15)
    for it in (10, 11, 500, 999_999):
        assert s.current_weight(it) == 1.25


def test_schedule_reciprocal_large_it():
    s = dp.ScalarWeightSchedule(0.0, 1.0, dp.ReciprocalIter())
    assert s.current_weight(999_999) == pytest.approx(1.0 - 1.0 / 1_000_000, rel=1e-15)


def test_schedule_accepts_numpy_integer_iteration():
    s = dp.ScalarWeightSchedule(1.0, 3.0, dp.Geometric(0.5))
    assert s.current_weight(np.int64(2)) == 2.5
    assert s.current_weight(np.int32(1)) == 2.0


@pytest.mark.parametrize("it", [-1, 1_000_000, 10**12])
def test_schedule_current_weight_out_of_range(it):
    s = dp.ScalarWeightSchedule(1.0, 3.0, dp.Geometric(0.5))
    with pytest.raises(ScheduleError, match=f"it = {it}|it must be ≥ 0, got {it}"):
        s.current_weight(it)


@pytest.mark.parametrize("it", [1.5, 2.0, "3", None, True])
def test_schedule_current_weight_not_integer(it):
    s = dp.ScalarWeightSchedule(1.0, 3.0, dp.Linear(2))
    with pytest.raises(ScheduleError, match="it must be a non-negative integer"):
        s.current_weight(it)


def test_schedule_step_stops_at_corrupted_counter():
    s = dp.ScalarWeightSchedule(1.0, 3.0, dp.Linear(2))
    s.iter_count = 999_999
    assert s.step() == 3.0
    assert s.iter_count == 1_000_000
    with pytest.raises(ScheduleError, match="implausible"):
        s.step()


def test_schedule_copy_is_independent_and_spec_round_trips():
    import json

    s = dp.ScalarWeightSchedule(0.5, 2.0, dp.Linear(5))
    s.step()
    s.step()
    c = s.copy()
    assert c == s and c is not s
    c.step()
    assert s.iter_count == 2 and c.iter_count == 3
    for kind in (dp.Geometric(0.25), dp.Linear(5), dp.ReciprocalIter()):
        s = dp.ScalarWeightSchedule(0.5, 2.0, kind)
        s.step()
        spec = json.loads(json.dumps(s.to_spec()))
        back = dp.ScalarWeightSchedule.from_spec(spec)
        assert back == s
        assert back.iter_count == 1
        assert [back.current_weight(i) for i in range(6)] == [s.current_weight(i) for i in range(6)]


def test_schedule_kinds_normalise_parameters():
    assert dp.Geometric(np.float32(0.5)).rate == 0.5
    assert isinstance(dp.Geometric(np.float32(0.5)).rate, float)
    assert dp.Linear(np.int64(3)).steps == 3
    assert dp.Linear(4.0).steps == 4  # whole float accepted
    s = dp.ScalarWeightSchedule(np.float32(0.5), 2, dp.ReciprocalIter())
    assert s.w_start == 0.5 and s.w_end == 2.0


# --------------------------------------------------------------------------- schedule parameter errors
# (the full list of messages is in test_errors.py; these check the class hierarchy)


def test_schedule_errors_are_value_errors():
    with pytest.raises(ValueError):
        dp.Geometric(1.0)
    assert issubclass(ScheduleError, InvalidArgumentError)
