"""Hydra launcher plugin `hydra/launcher=hpctrain_slurm`: a multirun sweep becomes one SLURM job array."""
