"""Long Range Arena: data loaders and generators, configs, training and evaluation CLIs.

- ``python -m experiments.lra.train --task listops --model s4d [--preset demo] [--set k=v]``
- ``python -m experiments.lra.evaluate --checkpoint runs/<run> [--data DIR]``
- ``python -m experiments.lra.listops --out data/listops-1000`` (seeded ListOps generator)
- ``python -m experiments.lra.pathfinder --out data/pathfinder32 --resolution 32``
- ``python -m experiments.lra.demo``: generate a small ListOps set, train S4D, evaluate.
"""
