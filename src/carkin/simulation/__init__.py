"""Solving models for virtual populations: the piecewise ODE solve, ``simulate``, streaming large
populations to disk, NCA, and simulated measurements."""
