"""Checkpoints: atomic writes, checksums, retention, and what survives a SIGKILL in the middle of a write."""

from __future__ import annotations

import logging
import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from hpctrain.run.checkpoint import CheckpointManager, state_dict_digest

from . import zygote


def state(step: int) -> dict:
    generator = torch.Generator().manual_seed(step)
    return {"step": step, "model": {"weight": torch.randn(4, 4, generator=generator)}, "notes": ["a", 1, 2.5]}


def test_save_and_load_round_trip_with_weights_only(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(5, state(5))
    assert torch.serialization.get_crc32_options()  # left out of our file only, not of the user's torch.save
    info = manager.newest_valid()
    assert info is not None and info.step == 5
    loaded = CheckpointManager.load(info)
    assert torch.equal(loaded["model"]["weight"], state(5)["model"]["weight"])
    assert state_dict_digest(loaded["model"]) == state_dict_digest(state(5)["model"])
    assert state_dict_digest(state(6)["model"]) != state_dict_digest(state(5)["model"])


def test_retention_keeps_last_k_best_and_listed_steps(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2, keep_steps=[20])
    for step in range(10, 80, 10):
        manager.save(step, state(step), protected_steps={30})
        assert manager.complete()[0].step == step  # complete when save returns; pruning runs in the background
    manager.wait()
    assert sorted(info.step for info in manager.complete()) == [20, 30, 60, 70]
    assert sorted(p.name for p in manager.directory.glob("*.pt")) == [
        f"step_{s:09d}.pt" for s in (20, 30, 60, 70)]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                           damage: str) -> None:
    manager = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        manager.save(step, state(step))
    newest = manager.directory / "step_000000003.pt"
    data = bytearray(newest.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        info = manager.newest_valid()
    assert info is not None and info.step == 2
    assert "step_000000003.pt is unusable" in caplog.text
    assert torch.equal(CheckpointManager.load(info)["model"]["weight"], state(2)["model"]["weight"])


def test_the_manifest_holds_the_files_crc32_and_a_manifest_with_a_sha256_still_loads_and_is_checked(
        tmp_path: Path) -> None:
    """The CRC-32 is of the whole file (zlib's, computed here independently); a checkpoint whose manifest holds a
    SHA-256 instead (written by an earlier hpctrain) is verified with it: loaded intact, refused corrupt."""
    import hashlib
    import json
    import zlib

    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(1, state(1))
    info = manager.complete()[0]
    data = info.path.read_bytes()
    assert info.manifest["crc32"] == f"{zlib.crc32(data):08x}" and "sha256" not in info.manifest
    manifest_path = info.path.with_suffix(".json")
    old = {key: value for key, value in info.manifest.items() if key != "crc32"}
    manifest_path.write_text(json.dumps({**old, "sha256": hashlib.sha256(data).hexdigest()}))
    old_info = manager.newest_valid()
    assert old_info is not None and old_info.step == 1 and "crc32" not in old_info.manifest
    assert torch.equal(CheckpointManager.load(old_info)["model"]["weight"], state(1)["model"]["weight"])
    manifest_path.write_text(json.dumps({**old, "sha256": hashlib.sha256(b"other").hexdigest()}))
    with pytest.raises(ValueError, match="SHA-256 does not match"):
        CheckpointManager.read_verified(manager.complete()[0])
    manifest_path.write_text(json.dumps(old))  # no checksum at all: unusable, skipped, not a crash
    with pytest.raises(ValueError, match="no size or no checksum"):
        CheckpointManager.read_verified(manager.complete()[0])
    assert manager.newest_valid() is None


WRITER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from hpctrain.run.checkpoint import CheckpointManager
    manager = CheckpointManager(Path(sys.argv[1]), keep_last=2)
    # ~400 MB: the write takes long enough to be killed in the middle of it.
    manager.save(2, {"step": 2, "model": {"weight": torch.ones(100_000_000)}})
""")


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(1, state(1))
    writer = zygote.start([sys.executable, "-c", WRITER, str(tmp_path)])
    deadline = time.monotonic() + 120
    temporaries: list[Path] = []
    while time.monotonic() < deadline and writer.poll() is None:
        temporaries = [p for p in manager.directory.glob(".step_000000002.pt.tmp-*") if p.stat().st_size > 0]
        if temporaries:
            break
        time.sleep(0.001)
    assert temporaries, "the writer never started writing"
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert not (manager.directory / "step_000000002.json").exists()
    info = manager.newest_valid()
    assert info is not None and info.step == 1
    assert torch.equal(CheckpointManager.load(info)["model"]["weight"], state(1)["model"]["weight"])
    manager.remove_stale_temporaries()
    assert list(manager.directory.glob(".*tmp*")) == []


# The loop goes on after save_async and the process dies while the thread writes: once its temporary file is
# there. fsync is slowed down so that the write cannot finish first on a busy machine (it did: a flaky test).
ASYNC_WRITER = textwrap.dedent("""
    import os, signal, sys, time, torch
    from pathlib import Path
    from hpctrain.run.checkpoint import CheckpointManager
    os.fsync = lambda fd: time.sleep(60)
    directory = Path(sys.argv[1])
    manager = CheckpointManager(directory, keep_last=2)
    manager.save_async(2, {"model": {"weight": torch.ones(64 << 20 // 4)}, "step": 2})
    while not list((directory / "checkpoints").glob(".step_000000002.pt.tmp-*")):
        time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_sigkill_during_a_background_write_leaves_the_previous_one_newest(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save_async(1, state(1))
    manager.close()  # a finished background write is complete
    assert [info.step for info in manager.complete()] == [1]
    writer = zygote.run([sys.executable, "-c", ASYNC_WRITER, str(tmp_path)], timeout=120)
    assert writer.returncode == -signal.SIGKILL
    assert not (manager.directory / "step_000000002.json").exists()
    info = manager.newest_valid()
    assert info is not None and info.step == 1
    assert torch.equal(CheckpointManager.load(info)["model"]["weight"], state(1)["model"]["weight"])


def test_async_writes_keep_the_state_of_their_step_and_commit_in_order(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=3)
    live = {"model": {"weight": torch.zeros(1000)}, "step": 0}
    for step in (1, 2, 3):
        live["model"]["weight"].fill_(step)  # the loop changes the weights in place right after saving
        live["step"] = step
        manager.save_async(step, live)
        live["model"]["weight"].fill_(-1)
    manager.close()
    for info in manager.complete():
        loaded = CheckpointManager.load(info)
        assert loaded["step"] == info.step and torch.all(loaded["model"]["weight"] == info.step)


def test_record_crc32_is_left_out_in_the_saving_thread_only() -> None:
    """A background checkpoint write must not change how the training thread's own torch.save calls write."""
    from hpctrain.run.checkpoint import _without_record_crc32

    entered, checked, inside = threading.Event(), threading.Event(), []

    def background_save() -> None:
        with _without_record_crc32():
            inside.append(torch.serialization.get_crc32_options())
            entered.set()
            checked.wait(10)

    thread = threading.Thread(target=background_save)
    thread.start()
    assert entered.wait(10)
    assert torch.serialization.get_crc32_options()  # this thread, meanwhile
    checked.set()
    thread.join()
    assert inside == [False]


def test_a_failed_pruning_is_logged_and_finished_by_the_next_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    real_unlink = Path.unlink
    monkeypatch.setattr(Path, "unlink", lambda self, *a, **k: (_ for _ in ()).throw(OSError(16, "busy"))
                        if self.suffix == ".pt" else real_unlink(self, *a, **k))
    with caplog.at_level(logging.WARNING):
        for step in (1, 2, 3):
            manager.save(step, state(step))
        manager.wait()  # no error: the checkpoints are written, only the deletion failed
    assert "pruning old checkpoints" in caplog.text and "busy" in caplog.text
    assert [info.step for info in manager.complete()] == [3, 2]  # manifest first: step 1 is no longer complete
    monkeypatch.undo()
    manager.save(4, state(4))
    manager.close()
    assert sorted(p.name for p in manager.directory.glob("*.pt")) == ["step_000000003.pt", "step_000000004.pt"]


def test_pruning_skips_a_run_directory_taken_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A background pruning that finds the run taken over deletes nothing and raises nothing (the next save's own
    commit check speaks for the new owner)."""
    from hpctrain.run import checkpoint
    from hpctrain.process.distributed import RunDirectoryTakenOver

    manager = CheckpointManager(tmp_path, keep_last=5)
    for step in (1, 2, 3):
        manager.save(step, state(step))
    manager.wait()
    manager.keep_last = 2

    def taken_over(run_dir: Path) -> None:
        raise RunDirectoryTakenOver(f"run directory {run_dir} was taken over")

    monkeypatch.setattr(checkpoint, "check_run_owner", taken_over)
    with caplog.at_level(logging.WARNING):
        manager._prune_after_write(set())
    assert "old checkpoints not pruned" in caplog.text
    assert [info.step for info in manager.complete()] == [3, 2, 1]
    monkeypatch.undo()
    manager._prune_after_write(set())
    assert [info.step for info in manager.complete()] == [3, 2]
