"""The timing maths of a run: the HVP cost separated from the plain step, medians, amortised cost."""

from __future__ import annotations

import math

import pytest

from bench import timing
from bench.timing import attribute_hvp_cost, median, summarise_timings


def _row(step, hvp, fb, up, data=0.0):
    return {"step": step, "is_hvp_step": hvp, "fwd_bwd_ms": fb, "update_ms": up, "data_ms": data,
            "step_ms": data + fb + up}


def test_timing_maths_by_hand():
    rows = [_row(1, True, 100.0, 100.0),                      # warm-up step: in no median
            _row(2, True, 7.0, 9.0, data=1.0), _row(3, False, 2.0, 1.0), _row(4, False, 4.0, 3.0),
            _row(5, False, 3.0, 2.0), _row(6, True, 5.0, 6.0)]
    attribute_hvp_cost(rows)
    # plain medians: fwd_bwd 3, update 2; HVP extras: (7-3)+(9-2)=11 and (5-3)+(6-2)=6
    assert [r["hvp_ms"] for r in rows[1:]] == [11.0, 0.0, 0.0, 0.0, 6.0]
    for r in rows:
        assert r["data_ms"] + r["fwd_bwd_ms"] + r["hvp_ms"] + r["update_ms"] == pytest.approx(r["step_ms"])
    s = summarise_timings(rows)
    assert s["step_time_ms"] == 5.0                           # median of 3, 7, 5
    assert s["fwd_bwd_time_ms"] == 3.0 and s["update_time_ms"] == 2.0
    assert s["hvp_time_ms"] == 8.5                            # median of 11 and 6; step 1 left out
    assert s["mean_step_ms"] == pytest.approx((17 + 3 + 7 + 5 + 11) / 5)
    assert s["hvp_steps"] == 3


def test_timing_without_plain_steps_is_nan():
    rows = [_row(1, True, 1.0, 1.0), _row(2, True, 2.0, 2.0)]
    attribute_hvp_cost(rows)
    s = summarise_timings(rows)
    assert math.isnan(s["step_time_ms"]) and math.isnan(s["hvp_time_ms"]) and s["hvp_steps"] == 2


def test_median_ignores_what_is_not_a_finite_number():
    assert median([3.0, math.nan, 1.0, math.inf, 2.0, None]) == 2.0
    assert math.isnan(median([math.nan]))


def test_tail_mean_is_the_mean_of_the_last_tenth_of_steps():
    losses = [float(i) for i in range(1, 21)]                  # 20 steps: the last 2 count
    assert timing.tail_mean(losses) == pytest.approx(19.5)
    assert timing.tail_mean(losses[:3]) == 3.0                 # at least the last step
    assert math.isnan(timing.tail_mean([]))
    assert math.isnan(timing.tail_mean([1.0, math.nan]))       # ended in NaN: no final loss
