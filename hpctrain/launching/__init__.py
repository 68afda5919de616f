"""The launching layer: from a command line to running ranks.

The Hydra app and its preflight (`app`), SLURM requests, submission and the task routine on the nodes (`slurm`),
one job's ranks, local or under SLURM (`job`), the local ranks' forkserver started early (`early`) and sweeps as job
arrays (`sweep`). It sits above the composition root (hpctrain.components) and the run layer, which it starts;
nothing below imports it.
"""
