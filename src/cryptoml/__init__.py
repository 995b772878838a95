"""cryptoml: a DVC-versioned, reproducible signal model for a crypto trading bot."""

import os

# OpenMP threads that spin while waiting make XGBoost and LightGBM 20x slower on a busy 2-core machine;
# passive waiting changes no result. Set before any of them is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
