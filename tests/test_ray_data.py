"""Ray Data as our jobs configure it (ct3dflow.adapters.ray_data.configure_data_context): no progress bars, and
a scheduling loop that is paced instead of spinning while it waits (its effect on Ray Train: bench/ and
docs/BENCHMARKS.md)."""

from __future__ import annotations

import time

from ray.data import DataContext

from ct3dflow.adapters.ray_data import MIN_STEP_S, SchedulingLoopPace, configure_data_context


def test_datasets_made_after_configuring_carry_the_pace_to_their_executor():
    ctx = DataContext.get_current()
    before = list(ctx.custom_execution_callback_classes)
    try:
        configure_data_context()
        configure_data_context()  # idempotent: each job may call it more than once
        assert ctx.custom_execution_callback_classes.count(SchedulingLoopPace) == 1
        assert not ctx.enable_progress_bars and not ctx.enable_operator_progress_bars
        # a dataset keeps a deep copy of the context it was made in, and that copy travels to its executor (the
        # split coordinator of a Ray Train run), whose planner instantiates its execution_callback_classes
        assert SchedulingLoopPace in ctx.copy().execution_callback_classes
    finally:
        ctx.custom_execution_callback_classes = before


def test_the_pace_spaces_a_spinning_loop_and_leaves_a_waiting_one_alone():
    spinning = SchedulingLoopPace()
    t0 = time.perf_counter()
    for _ in range(20):  # a loop that goes round without blocking
        spinning.on_execution_step(None)
    assert time.perf_counter() - t0 >= 19 * MIN_STEP_S  # sleep never returns early
    assert spinning.slept_s >= 0.9 * 19 * MIN_STEP_S

    waiting = SchedulingLoopPace()
    for _ in range(5):  # a loop whose steps block longer than the pace
        waiting.on_execution_step(None)
        time.sleep(1.5 * MIN_STEP_S)
    assert waiting.slept_s == 0.0
