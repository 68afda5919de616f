"""Using what a run learned: `load_model`/`load_run` (`runs`), `predict`, `test`, `export` and `inspect`.

Above the launching layer (predict and test run their ranks locally or on SLURM like training does) and the
tuning layer (inspect summarizes studies too).
"""
