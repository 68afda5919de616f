"""Comet offline: the steps a Comet offline experiment's own archives hold, read from Comet's private archive format.

Why a private format: Comet keeps every repeated step (a resend would show twice) and archives a process's messages
only when it ends, so after a kill only the archives tell which steps reached one; no public API reads an offline
archive before `comet upload` (docs/watching.md).

Format: `comet/<key>.zip` (the experiment's first archive) and `comet/<key>-<suffix>.zip` (each later process's,
`ExistingOfflineExperiment`), zip files holding `experiment.json` (`offline_id`: the key, `start_time`) and
`messages.json` (JSON lines; a metric is `{"type": "metric_msg", "payload": {"metric": {"metricName", "step",
"metricValue"}}}`). Tested: comet_ml>=3.40,<3.59 (`FORMAT`; the `comet` extra pins the same range, and
tests/test_loggers.py reads archives the installed version wrote).

Outside that range, or when an archive does not parse (no `experiment.json`/`messages.json`, no `offline_id`, a
metric of another shape), one warning names the installed version, the range and the loss; then `stored_metrics`
returns None and the feed trusts hpctrain's own record of what it handed to Comet (loggers/comet.json): nothing is
sent twice, and the steps a SIGKILLed process handed to Comet (which it never archived) are missing. Whether the
experiment has a first archive to append to is then told by the name Comet gives it, `<key>.zip`, holding files.
No format change either: the empty zip Comet writes at a process's start (to check the directory; a SIGKILLed
process leaves it so), skipped; and an archive cut short (a kill while Comet wrote it), which Comet cannot upload
either, skipped with a warning: its steps are sent again.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

from hpctrain.loggers.pinned import FormatChanged, PinnedFormat

log = logging.getLogger(__name__)

FORMAT = PinnedFormat(
    package="comet_ml", lowest="3.40", below="3.59", extra="comet", tracker="Comet offline",
    reader="Comet's offline archives (comet/<key>*.zip: experiment.json, messages.json)",
    lost="steps that a process killed by SIGKILL handed to Comet (it archives only at a process's end) are missing "
         "from the uploaded experiment (hpctrain trusts its own record, loggers/comet.json, and resends no step it "
         "recorded as sent)")

# Archives cut short already reported in this process.
_incomplete: set[Path] = set()


def stored_metrics(directory: Path, key: str) -> list[tuple[str, int, float]] | None:
    """`read_metrics`, or None (after the one warning) under an untested version or when an archive does not parse."""
    return FORMAT.read(read_metrics, directory, key)


def has_archive(directory: Path, key: str) -> bool:
    """Whether the experiment has an archive to append to; by Comet's name for the first one where the archives
    cannot be read (warned)."""
    if FORMAT.supported():
        try:
            return bool(archives(directory, key))
        except FormatChanged as error:
            FORMAT.unreadable(str(error))
    try:
        with zipfile.ZipFile(Path(directory) / f"{key}.zip") as archive:
            return bool(archive.namelist())  # not the empty zip of a process that never ended
    except (OSError, zipfile.BadZipFile):
        return False


def archives(directory: Path, key: str) -> list[Path]:
    """One experiment's offline archives, oldest first (`comet upload` them in this order). Raises FormatChanged."""
    found = []
    for path in Path(directory).glob(f"{key}*.zip"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = set(archive.namelist())
                if not names:  # the zip Comet writes at a process's start: that process never archived
                    continue
                if not {"experiment.json", "messages.json"} <= names:
                    raise FormatChanged(f"{path} holds {sorted(names)[:8]}, not experiment.json and messages.json")
                meta = json.loads(archive.read("experiment.json"))
        except zipfile.BadZipFile:
            _skip_incomplete(path)
            continue
        except (OSError, ValueError) as error:
            raise FormatChanged(f"{path}: {error}") from error
        if not isinstance(meta, dict) or not isinstance(meta.get("offline_id"), str):
            raise FormatChanged(f"{path}: experiment.json has no offline_id")
        if meta["offline_id"] == key:
            found.append((meta.get("start_time") or 0, path))
    return [path for _, path in sorted(found)]


def read_metrics(directory: Path, key: str) -> list[tuple[str, int, float]]:
    """Every metric (name, step, value) one experiment's offline archives hold, in order (their messages.json).
    Raises FormatChanged."""
    metrics = []
    for path in archives(directory, key):
        with zipfile.ZipFile(path) as archive:
            lines = archive.read("messages.json").decode().splitlines()
        try:
            for line in lines:
                message = json.loads(line)
                if message.get("type") == "metric_msg":
                    metric = message["payload"]["metric"]
                    metrics.append((metric["metricName"], int(metric["step"]), float(metric["metricValue"])))
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise FormatChanged(f"{path}: a message of another shape ({error!r})") from error
    return metrics


def _skip_incomplete(path: Path) -> None:
    if path not in _incomplete:
        _incomplete.add(path)
        log.warning("%s is not a complete zip (a kill while Comet wrote it): hpctrain sends its steps again; leave it "
                    "out of `comet upload`, which cannot read it either", path)
