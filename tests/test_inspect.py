"""`python -m hpctrain.inspect`'s account of what the loggers could not send (a run whose MLflow server went away
for good writes it: tests/test_loggers.py checks that run's inspect output too)."""

from __future__ import annotations

import json
from pathlib import Path

from hpctrain.use.inspect import format_summary, summarize


def test_inspect_lists_what_each_logger_could_not_send(tmp_path: Path) -> None:
    (tmp_path / "loggers").mkdir()
    missing = {"rows": {"train": {"first": 9, "last": 24, "rows": 16}, "validation": {"first": 12, "last": 12,
                                                                                      "rows": 1}},
               "run_end": True}
    (tmp_path / "loggers" / "mlflow.json").write_text(json.dumps({"run_id": "abc", "not_sent": missing}))
    (tmp_path / "loggers" / "mlflow.test.best.json").write_text(json.dumps(
        {"run_id": "def", "not_sent": {"rows": {"test": {"first": 24, "last": 24, "rows": 1}}}}))
    (tmp_path / "loggers" / "tensorboard.json").write_text(json.dumps({"delivered": {"train": 24}}))  # all sent

    summary = summarize(tmp_path)
    assert summary["loggers_not_sent"] == {"mlflow": missing, "mlflow.test.best": {
        "rows": {"test": {"first": 24, "last": 24, "rows": 1}}}}
    text = format_summary(summary)
    assert ("logger     mlflow: not sent to its tracker: train steps 9-24 (16 rows), validation step 12, the run's "
            "end (status, plots, best checkpoint) (in metrics.h5; the next start of this run sends them)") in text
    assert "logger     mlflow.test.best: not sent to its tracker: test step 24 (in metrics.h5; the same " \
           "hpctrain.test command (the same --name) sends them)" in text
    assert "tensorboard" not in text
