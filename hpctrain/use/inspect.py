"""`python -m hpctrain.inspect RUN_DIR`: a short summary of a run, also while it is running; given a sweep
directory, one line per point (state, SLURM job, steps, best validation loss); given a tune directory
(hpctrain.tune), the study: its best trial, the trials by state, and Optuna's plots written to TUNE_DIR/plots/.

Prints steps done, the latest metrics, where the step time goes (data, forward+backward, optimizer, bookkeeping;
memory) with advice, the best evaluation (by the run's callbacks.monitor: the validation loss unless it names a
metric, min or max), the checkpoints, and the SHA-256 digest of the newest checkpoint's model weights: two runs
with equal digests have bitwise-equal weights.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from hpctrain.run import breakdown
from hpctrain.run.averaging import weights_kind, weights_of
from hpctrain.run.checkpoint import CheckpointManager, state_dict_digest
from hpctrain.config import ConfigError
from hpctrain.process.history import attempts, format_history, read as read_history
from hpctrain.run.metrics import METRICS_FILENAME, baseline_ratios, open_for_reading, validation_names
from hpctrain.launching.sweep import point_status
from hpctrain.loggers import describe_not_sent, not_sent
from hpctrain.tuning.study import is_tune_dir


def summarize(run_dir: Path) -> dict[str, Any]:
    summary: dict[str, Any] = {"run_dir": str(run_dir), "jobs": attempts(read_history(run_dir)),
                               # What each logger could not send to its tracker (its server away), by logger.
                               "loggers_not_sent": not_sent(run_dir)}
    metrics_path = run_dir / METRICS_FILENAME
    if metrics_path.exists():
        with open_for_reading(metrics_path) as file:
            steps = file["train/step"]
            summary["steps_logged"] = int(steps.shape[0])
            if steps.shape[0]:
                last = steps.shape[0] - 1
                summary["latest"] = {
                    "step": int(steps[last]), "epoch": int(file["train/epoch"][last]),
                    "loss": float(file["train/loss"][last]), "grad_norm": float(file["train/grad_norm"][last]),
                    "samples_per_second": float(file["train/samples_per_second"][last]),
                    "lr": [float(v) for v in file["train/lr"][last]],
                }
                summary["nonfinite_steps"] = int(file["train/nonfinite"][()].sum())
                summary["breakdown"] = _breakdown(file)
            summary["task"] = str(file.attrs.get("task", ""))
            validation_loss = file["validation/loss"][()] if "validation/loss" in file else []
            if len(validation_loss):
                # Every per-sample value's mean at the latest and the best evaluation (loss, components, metrics).
                means = {name: file[f"validation/{name}"][()] for name in validation_names(file)}
                metric, mode = _monitor(file)
                monitored = means.get(metric, validation_loss)
                summary["evaluations"] = int(len(validation_loss))
                summary["latest_validation"] = {"step": int(file["validation/step"][-1]),
                                                "loss": _finite_or_none(validation_loss[-1]),
                                                "metrics": {name: _finite_or_none(v[-1]) for name, v in means.items()}}
                if "validation/nonfinite_samples" in file:
                    summary["latest_validation"]["nonfinite_samples"] = int(file["validation/nonfinite_samples"][-1])
                finite = np.flatnonzero(np.isfinite(monitored))
                if not len(finite):  # no evaluation has a finite monitored mean: there is no best one
                    return _with_checkpoints(summary, run_dir)
                best = int(finite[np.argmax(monitored[finite]) if mode == "max" else np.argmin(monitored[finite])])
                summary["best_validation"] = {"step": int(file["validation/step"][best]),
                                              "loss": float(validation_loss[best]),
                                              "monitor": {"metric": metric, "mode": mode,
                                                          "value": float(monitored[best])},
                                              "metrics": {name: _finite_or_none(v[best])
                                                          for name, v in means.items()}}
                summary["best_validation"]["baseline_ratios"] = baseline_ratios(
                    float(validation_loss[best]), summary["best_validation"]["metrics"])
    return _with_checkpoints(summary, run_dir)


def _with_checkpoints(summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The summary with the run's checkpoints and the newest intact one's weights digest."""
    manager = CheckpointManager(run_dir, keep_last=2)
    checkpoints = manager.complete()
    summary["checkpoints"] = [info.step for info in reversed(checkpoints)]
    newest = manager.newest_valid()
    if newest is not None:
        state = CheckpointManager.load(newest)
        summary["newest_checkpoint"] = {"step": newest.step, "path": str(newest.path),
                                        "finished": bool(state.get("finished", False)),
                                        "stop_reason": state["train_state"].get("stop_reason", ""),
                                        # Of the weights load_model/predict/test/export take (the average, if
                                        # any: `weights` says which), and of the raw weights.
                                        "weights": weights_kind(state),
                                        "model_sha256": state_dict_digest(weights_of(state)),
                                        "raw_sha256": state_dict_digest(state["model"])}
    return summary


def _breakdown(file: Any) -> dict[str, Any] | None:
    """Where the latest steps' time went, and the advice it gives (None: a metrics.h5 from before the breakdown)."""
    train = file["train"]
    first = max(0, train["step"].shape[0] - breakdown.SUMMARY_ROWS - 1)
    names = ["time_step", *breakdown.PARTS, "rss", "max_memory_allocated", "gpu_utilization"]
    found = breakdown.summarize({name: train[name][first:] for name in names if name in train})
    if found is None:
        return None
    try:
        config = json.loads(file["config"][()])
        settings = {"num_workers": int(config["data"]["num_workers"]),
                    "flush_every_seconds": float(config["callbacks"]["metrics"]["flush_every_seconds"])}
    except (KeyError, TypeError, ValueError):
        settings = {}
    return {**asdict(found), "advice": breakdown.advice(found, **settings)}


def _monitor(file: Any) -> tuple[str, str]:
    """The run's callbacks.monitor (metric, mode) from the config metrics.h5 holds; a run from before it: loss."""
    try:
        monitor = json.loads(file["config"][()])["callbacks"]["monitor"]
        return str(monitor["metric"]), str(monitor["mode"])
    except (KeyError, TypeError, ValueError):
        return "loss", "min"


def strict_json(value: Any) -> Any:
    """`value` with every NaN or infinity as None, so `--json` prints strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _number(value: float | None) -> str:
    return "NaN" if value is None else f"{value:.5g}"


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"run        {summary['run_dir']}" + (f" (task {summary['task']})" if summary.get("task") else "")]
    newest = summary.get("newest_checkpoint")
    status = "no checkpoint yet" if newest is None else (
        f"finished ({newest['stop_reason']})" if newest["finished"] else "in progress or interrupted")
    lines.append(f"status     {status}")
    if "latest" in summary:
        latest = summary["latest"]
        lr = ", ".join(f"{value:.3g}" for value in latest["lr"])
        lines.append(f"steps      {summary['steps_logged']} logged; latest step {latest['step']} (epoch "
                     f"{latest['epoch']}): loss {latest['loss']:.5g}, grad norm {latest['grad_norm']:.3g}, "
                     f"lr {lr}, {latest['samples_per_second']:.0f} samples/s")
        if summary.get("nonfinite_steps"):
            lines.append(f"nonfinite  {summary['nonfinite_steps']} steps skipped (NaN/Inf)")
        if summary.get("breakdown"):
            found = dict(summary["breakdown"])
            advice = found.pop("advice")
            lines += breakdown.format_breakdown(breakdown.Breakdown(**found), advice)
    if "latest_validation" in summary:
        latest_validation = summary["latest_validation"]
        lines.append(f"validation {summary['evaluations']} evaluations; latest: loss "
                     f"{_number(latest_validation['loss'])} at step {latest_validation['step']}"
                     + (f", {latest_validation['nonfinite_samples']} sample(s) with NaN/Inf left out of the means"
                        if latest_validation.get("nonfinite_samples") else ""))
        if "best_validation" not in summary:
            lines.append("  best: none (no evaluation has a finite monitored mean)")
    if "best_validation" in summary:
        best = summary["best_validation"]
        monitor = best.get("monitor", {"metric": "loss", "mode": "min", "value": best["loss"]})
        shown = "" if monitor["metric"] == "loss" else f" ({monitor['mode']} of it; loss {best['loss']:.5g})"
        lines.append(f"  best: {monitor['metric']} {monitor['value']:.5g} at step {best['step']}{shown}")
        for name, ratio in best["baseline_ratios"].items():
            lines.append(f"  best loss / {name} = {ratio:.3f} ({_number(best['metrics'][name])})")
        for name, value in best["metrics"].items():
            if name != "loss" and not name.startswith("baseline_"):
                lines.append(f"  {name:<40} {_number(value)} (at the best step)")
    lines.append(f"checkpoints {', '.join(map(str, summary['checkpoints'])) or 'none'}")
    if newest is not None:
        lines.append(f"weights    sha256 {newest['model_sha256']} (step {newest['step']}, {newest['weights']})")
        if newest["weights"] != "raw":
            lines.append(f"           raw weights sha256 {newest['raw_sha256']}")
    for name, missing in summary.get("loggers_not_sent", {}).items():  # a test phase's: <logger>.test.<name>
        later = ("the same hpctrain.test command (the same --name) sends them" if ".test." in name else
                 "the run has finished: hpctrain does not send them later" if newest and newest["finished"] else
                 "the next start of this run sends them")  # as the logger's own warning says (hpctrain.loggers)
        lines.append(f"logger     {name}: not sent to its tracker: {describe_not_sent(missing)} (in metrics.h5; "
                     f"{later})")
    lines += format_history(Path(summary["run_dir"]))
    return "\n".join(lines)


# -- sweeps -----------------------------------------------------------------------------------------------------
def is_sweep_dir(directory: Path) -> bool:
    return not (directory / "checkpoints").exists() and any(
        (child / ".hydra").is_dir() for child in directory.iterdir() if child.is_dir())


def summarize_sweep(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for run_dir in sorted(child for child in sweep_dir.iterdir() if (child / ".hydra").is_dir()):
        state, job_id = point_status(run_dir)
        summary = summarize(run_dir)
        rows.append({"point": run_dir.name, "state": state, "job_id": job_id,
                     "step": summary.get("latest", {}).get("step", 0),
                     "best_validation_loss": summary.get("best_validation", {}).get("loss"),
                     "run_dir": str(run_dir)})
    return rows


def format_sweep(rows: list[dict[str, Any]]) -> str:
    width = max([len(row["point"]) for row in rows] + [5])
    lines = [f"{'point':<{width}}  {'state':<13} {'job':<12} {'step':>6}  best validation loss"]
    for row in rows:
        best = "-" if row["best_validation_loss"] is None else f"{row['best_validation_loss']:.5g}"
        lines.append(f"{row['point']:<{width}}  {row['state']:<13} {row['job_id'] or '-':<12} {row['step']:>6}  {best}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from hpctrain.process.exit import skip_final_collection

    skip_final_collection()
    parser = argparse.ArgumentParser(prog="python -m hpctrain.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        print(f"hpctrain.inspect: error: {args.run_dir} is not a directory", file=sys.stderr)
        return 2
    if is_tune_dir(args.run_dir):
        from hpctrain.tuning.study import format_study, plot_study, summarize_study

        try:
            study = summarize_study(args.run_dir)
        except ConfigError as error:
            print(f"hpctrain.inspect: error: {error}", file=sys.stderr)
            return 2
        study["plots"] = [str(path) for path in plot_study(args.run_dir)]
        print(json.dumps(strict_json(study), indent=1) if args.json else
              format_study(study) + "".join(f"\nplot       {path}" for path in study["plots"]))
        return 0
    if is_sweep_dir(args.run_dir):
        rows = summarize_sweep(args.run_dir)
        print(json.dumps(strict_json(rows), indent=1) if args.json else format_sweep(rows))
        return 0
    summary = summarize(args.run_dir)
    if args.json:
        print(json.dumps(strict_json(summary), indent=1))
    else:
        print(format_summary(summary))
    return 0

