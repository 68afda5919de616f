"""The ranks of one multi-rank tune worker on SLURM (a trial of launcher.nodes x launcher.tasks_per_node ranks):
rank 0 asks the study for each trial and shares it with the other ranks; every rank then trains it.

The ranks talk through the job's rendezvous store, the TCP store that rank 0 serves at MASTER_ADDR:MASTER_PORT
for as long as the worker lives. Each trial's process group forms on a prefix of that store of its own
(`Trial.store`, `group/k/`): a group formed on a store of its own would have to bind the same port while this
one serves it. Rank 0 shares trial k under the key `trial/k`, and `None` when the study has all its trials; the
other ranks wait for it, so they never ask the study themselves and every rank trains the same parameters in the
same run directory.

The ranks stay in step whatever happens to a trial on one of them: after each trial every rank says it is done
with it (`trial_ended`, also after an exception), and rank 0 asks the study for the next one only once all have.
A rank that failed early (its user code raised, its rendezvous timed out) therefore waits for the others to leave
the trial too, through their own collective or rendezvous timeout, instead of running ahead into the next trial's
rendezvous alone. Those waits are bounded by `wait_s` (twice the collective timeout plus the rendezvous timeout:
the longest one rank can still be in a trial the other has left); a rank that dies breaks them at once (its
connection to the store closes, and `--kill-on-bad-exit` ends the job step). Rank 0 waits for every rank to have
read the `None` before its process, and the store with it, ends.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Assignment:
    """One trial as rank 0 shares it: everything another rank needs to train it."""

    number: int  # the trial's number (a retry's is its own)
    trial_id: int  # Optuna's id of it (the pruner's judge, on rank 0)
    run_dir: str
    overrides: list[str]  # the trial's parameters as overrides


@dataclass(frozen=True)
class Trial:
    assignment: Assignment | None  # None: the study has all its trials
    store: Any  # the store the trial's process group forms on


class TrialRanks:
    """This process's rank among the worker's ranks, and the store they share (see the module's docstring)."""

    def __init__(self, rank: int, world_size: int, *, timeout_s: int, rendezvous_timeout_s: int) -> None:
        from hpctrain.process.distributed import rendezvous_store

        self.rank, self.world_size = rank, world_size
        self.wait_s = 2 * timeout_s + rendezvous_timeout_s
        self.store = rendezvous_store(rank, world_size, datetime.timedelta(seconds=rendezvous_timeout_s))
        self._sequence = 0
        self.current = Trial(None, None)  # the trial last shared

    @staticmethod
    def of_job(timeout_s: int, rendezvous_timeout_s: int) -> TrialRanks | None:
        """The ranks of this SLURM job step (submitit's environment, exported for the store), None for one rank."""
        import submitit

        environment = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                            overwrite=True)
        if environment.world_size == 1:
            return None
        return TrialRanks(environment.rank, environment.world_size, timeout_s=timeout_s,
                          rendezvous_timeout_s=rendezvous_timeout_s)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, assignment: Assignment | None = None) -> Trial:
        """Rank 0: share `assignment` (None: no trial is left). Another rank: wait for rank 0's and return it."""
        import torch.distributed as dist

        key = f"trial/{self._sequence}"
        store = dist.PrefixStore(f"group/{self._sequence}/", self.store)
        self._sequence += 1
        if self.is_main:
            self.store.set(key, json.dumps(None if assignment is None else asdict(assignment)))
            if assignment is None:  # the others must read it before this process, and the store, ends
                self._wait_for([f"{key}/read/{rank}" for rank in range(1, self.world_size)], "read the study's end")
            self.current = Trial(assignment, store)
            return self.current
        self._wait_for([key], "named a trial")
        payload = json.loads(self.store.get(key))
        if payload is None:
            self.store.set(f"{key}/read/{self.rank}", "1")
        self.current = Trial(None if payload is None else Assignment(**payload), store)
        return self.current

    def trial_ended(self) -> None:
        """This rank is done with the trial last shared (trained, stopped or failed); rank 0 waits for all ranks."""
        key = f"trial/{self._sequence - 1}/ended"
        self.store.set(f"{key}/{self.rank}", "1")
        if self.is_main:
            self._wait_for([f"{key}/{rank}" for rank in range(1, self.world_size)], "left the trial")

    def _wait_for(self, keys: list[str], what: str) -> None:
        import torch.distributed as dist

        # Set each time: a trial's process group sets the timeout of the store it shares with this one.
        self.store.set_timeout(datetime.timedelta(seconds=self.wait_s))
        try:
            self.store.wait(keys)
        except dist.DistStoreError as error:
            waited_for = "rank 0" if not self.is_main else "every other rank"
            raise RuntimeError(f"rank {self.rank}: {waited_for} of this tune worker never {what} within "
                               f"{self.wait_s} s (2 x trainer.distributed_timeout_s + trainer.rendezvous_timeout_s):"
                               f" {error}") from None
