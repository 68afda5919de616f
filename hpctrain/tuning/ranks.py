"""The ranks of one multi-rank tune worker on SLURM (a trial of launcher.nodes x launcher.tasks_per_node ranks):
rank 0 asks the study for each trial and shares it with the other ranks; every rank then trains it.

The ranks talk through the job's rendezvous store, the TCP store that rank 0 serves at MASTER_ADDR:MASTER_PORT
for as long as the worker lives. Each trial's process group forms on a prefix of that store of its own
(`Trial.store`, `group/k/`): a group formed on a store of its own would have to bind the same port while this
one serves it. Rank 0 shares trial k under the key `trial/k`, and `None` when the study has all its trials; the
other ranks wait for it (up to trainer.distributed_timeout_s), so they never ask the study themselves and every
rank trains the same parameters in the same run directory. Rank 0 waits for every rank to have read the `None`
before its process (and the store with it) ends.

Within a trial the ranks agree on the rest as in any run: the trainer broadcasts rank 0's prune decision at each
evaluation (hpctrain.run.trainer), and a stop signal stops every rank at the same step boundary, so every rank
returns the same "stopped" or goes on to the next trial together.
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
        self.timeout_s = timeout_s
        self.store = rendezvous_store(rank, world_size, datetime.timedelta(seconds=rendezvous_timeout_s))
        self.store.set_timeout(datetime.timedelta(seconds=timeout_s))
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
                self.store.wait([f"{key}/read/{rank}" for rank in range(1, self.world_size)])
            self.current = Trial(assignment, store)
            return self.current
        try:
            payload = json.loads(self.store.get(key))
        except dist.DistStoreError as error:
            raise RuntimeError(f"rank {self.rank}: rank 0 of this tune worker named no trial within "
                               f"trainer.distributed_timeout_s={self.timeout_s} s ({error})") from None
        if payload is None:
            self.store.set(f"{key}/read/{self.rank}", "1")
        self.current = Trial(None if payload is None else Assignment(**payload), store)
        return self.current
