"""Robustness of diagonal SSM initialisations (PTD, Yu et al. 2024): S4D-LegS vs S4-PTD.

Step 1 (:mod:`experiments.robustness.transfer`) compares the transfer functions of HiPPO-LegS,
its S4D diagonal approximation and its PTD diagonalisation and locates S4D's spikes; step 2
(:mod:`experiments.robustness.noise`) trains S4D and S4-PTD models on a synthetic long-range
task and evaluates them with Fourier-mode noise at those frequencies. ``python -m
experiments.robustness`` runs both and writes the summary under ``results/``.
"""
