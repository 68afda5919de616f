"""Where the step time goes (hpctrain.run.breakdown): the clock's arithmetic on a scripted clock, the summary of a
metrics.h5's columns (also one from before the breakdown), and inspect's advice. The columns of a real run and
inspect's lines: tests/test_train.py (test_an_untracked_norm_is_recorded_as_nan_and_changes_no_update)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hpctrain.run import breakdown
from hpctrain.run.breakdown import Breakdown, StepClock, advice, format_breakdown, summarize
from hpctrain.use.inspect import format_summary
from hpctrain.use.inspect import summarize as summarize_run
from hpctrain.run.metrics import MetricsWriter


class ScriptedTime:
    """time.perf_counter returning the given instants, one per call."""

    def __init__(self, *instants: float) -> None:
        self.instants = list(instants)

    def perf_counter(self) -> float:
        return self.instants.pop(0)


def one_step(clock: StepClock) -> None:
    """The marks of one step, in the loop's order (their instants come from the ScriptedTime)."""
    clock.data_started()
    clock.data_done()
    clock.step_started()
    clock.backward_done()
    clock.step_done()


def test_the_parts_of_a_cpu_step_add_up_and_evaluations_are_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    # restart 0; data 1 -> 3; step 4 -> fwd/bwd done 10 -> done 11; evaluation of 100 s excluded; row at 112.
    # Then step 2: data 112.5 -> 113, step 113 -> 114 -> 116, row at 116.5.
    clock = StepClock(torch.device("cpu"), enabled=True)
    monkeypatch.setattr(breakdown, "time", ScriptedTime(0, 1, 3, 4, 10, 11, 112, 112.5, 113, 113, 114, 116, 116.5))
    clock.restart()
    one_step(clock)
    clock.excluded(100.0)
    columns, deferred = clock.row()
    assert deferred is None
    assert {name: columns[name] for name in ("time_step", *breakdown.PARTS)} == {
        "time_step": 12.0, "time_data": 2.0, "time_forward_backward": 6.0, "time_optimizer": 1.0,
        "time_bookkeeping": 3.0}
    assert columns["rss"] > 0 and "gpu_utilization" not in columns  # a CPU: no utilisation column
    one_step(clock)
    columns, _ = clock.row()
    assert (columns["time_step"], columns["time_data"], columns["time_forward_backward"], columns["time_optimizer"],
            columns["time_bookkeeping"]) == (4.5, 0.5, 1.0, 2.0, 1.0)


def test_a_disabled_clock_records_nothing() -> None:
    clock = StepClock(torch.device("cpu"), enabled=False)
    clock.restart()
    one_step(clock)
    assert clock.row() == ({}, None)
    clock.close()


def columns(step: list[float], data: list[float], forward_backward: list[float], optimizer: list[float]
            ) -> dict[str, np.ndarray]:
    bookkeeping = [s - d - f - o for s, d, f, o in zip(step, data, forward_backward, optimizer)]
    return {"time_step": np.array(step), "time_data": np.array(data),
            "time_forward_backward": np.array(forward_backward), "time_optimizer": np.array(optimizer),
            "time_bookkeeping": np.array(bookkeeping),
            "rss": np.array([1.0, 2.0, 3.0 * 2**30, np.nan][:len(step)])}


def test_summary_shares_leave_out_the_first_row_and_rows_without_the_breakdown() -> None:
    # The first row (start-up) is left out; the NaN row is one from before a restart that added the breakdown.
    found = summarize(columns([9.0, 1.0, np.nan, 1.0], [9.0, 0.6, np.nan, 0.64], [0.0, 0.3, np.nan, 0.3],
                              [0.0, 0.05, np.nan, 0.04]))
    assert found is not None and found.steps == 2 and found.mean_step_s == pytest.approx(1.0)
    assert found.shares == pytest.approx({"time_data": 0.62, "time_forward_backward": 0.3, "time_optimizer": 0.045,
                                          "time_bookkeeping": 0.035})
    assert found.rss_bytes == 3.0 * 2**30 and math.isnan(found.max_memory_allocated)
    assert math.isnan(found.gpu_utilization)


def test_a_metrics_file_from_before_the_breakdown_has_none() -> None:
    assert summarize({"loss": np.ones(5)}) is None
    assert summarize(columns([1.0], [0.5], [0.3], [0.1])) is None  # one row: start-up only


def shares(data: float, forward_backward: float, optimizer: float, *, utilization: float = math.nan) -> Breakdown:
    return Breakdown(steps=10, mean_step_s=0.1, shares={
        "time_data": data, "time_forward_backward": forward_backward, "time_optimizer": optimizer,
        "time_bookkeeping": 1 - data - forward_backward - optimizer}, rss_bytes=2**30, max_memory_allocated=math.nan,
        gpu_utilization=utilization)


def test_advice_names_what_bounds_the_step_and_the_key_to_change() -> None:
    data_bound = advice(shares(0.62, 0.3, 0.05), num_workers=0, flush_every_seconds=10.0)
    assert len(data_bound) == 1 and data_bound[0].startswith("data 62% of step time: raise data.num_workers (now 0)")
    assert "chosen automatically" in advice(shares(0.62, 0.3, 0.05), num_workers=-1)[0]
    assert advice(shares(0.05, 0.85, 0.05)) == []  # compute-bound: as it should be
    bookkeeping = advice(shares(0.05, 0.55, 0.05), flush_every_seconds=0.0)
    assert len(bookkeeping) == 1 and bookkeeping[0].startswith("bookkeeping 35% of step time")
    assert "flush_every_seconds=0" in bookkeeping[0]
    assert advice(shares(0.05, 0.45, 0.45))[0].startswith("optimizer 45% of step time")
    gpu = advice(shares(0.05, 0.85, 0.05, utilization=20.0))
    assert gpu == ["GPU utilisation 20%: the GPU waits for the host; a larger trainer.micro_batch_size or "
                   "trainer.compile=true gives it more work per launch"]


def test_format_breakdown_lines() -> None:
    found = shares(0.62, 0.3, 0.05, utilization=71.0)
    lines = format_breakdown(found, advice(found, num_workers=0))
    assert lines[0] == ("time       100 ms per step (mean of the latest 10): data 62%, forward+backward 30%, "
                        "optimizer 5%, bookkeeping 3%")
    assert lines[1] == "memory     RSS 1.00 GiB, GPU utilisation 71%"
    assert lines[2].startswith("advice     data 62% of step time: raise data.num_workers (now 0)")


def test_inspect_reads_a_metrics_file_from_before_the_breakdown(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path / "metrics.h5", parameter_groups=["default"],
                           validation_sample_index=np.arange(3), config_json="{}", task_name="toy", cursor=None)
    for step in range(1, 4):
        writer.log_step(step=step, epoch=0, loss=1.0, grad_norm=0.5, samples_per_second=10.0, nonfinite=False,
                        learning_rates=[0.1])
    writer.close()
    summary = summarize_run(tmp_path)
    assert summary["steps_logged"] == 3 and summary["breakdown"] is None
    assert "time       " not in format_summary(summary)
