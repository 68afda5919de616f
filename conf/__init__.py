"""hpctrain's shipped Hydra configs (the YAML files in this directory), installed as the package `hpctrain.conf`
so that `python -m hpctrain.launch` finds them from any directory (see pyproject.toml)."""
