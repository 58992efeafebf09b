import os

# Plots in tests (and in the example scripts they start) must not need a display.
os.environ.setdefault("MPLBACKEND", "Agg")
