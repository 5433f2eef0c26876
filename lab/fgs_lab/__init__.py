"""fgs_lab: training and experiment code shared by `examples/` and `bench/`; never part of a deployment.

A distribution of its own (`lab/pyproject.toml`), installed beside fgs in the development environment by
`scripts/setup.sh`: the deployment images cannot contain it because `pip install .` never sees it.
"""
