"""The process layer: what one training process is and how it ends.

The process group and its device (`distributed`), the forkserver this machine's own processes fork from
(`forkserver`), the stop protocol that turns SLURM's signals, a dead rank or a hang into a decision (`stop`: one
state machine; `slurm_view`: SLURM's view of the job; `watchdog`), the run's job history (`history`), determinism
and RNG states (`seeding`), a quick exit (`exit`) and no fork while a thread starts a child process
(`fork_guard`). It imports only hpctrain.config: every layer above may use it.
"""
