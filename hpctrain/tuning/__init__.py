"""Hyperparameter search (`python -m hpctrain.tune`): the command (`command`), the search space (`space`), the
study on shared storage (`study`) and the workers that train its trials (`worker`). Above the launching layer,
whose jobs train each trial as a normal run.
"""
