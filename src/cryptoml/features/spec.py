"""What the 12 features are: names, parameters and version, whose hash every model records.

Apart from cryptoml.features.manager (numba, pandas) so that checking a model's feature spec at load costs no
heavy import; cryptoml.features.manager computes the values from these same constants.
"""

from __future__ import annotations

import hashlib
import json

FEATURE_VERSION = "1.0.0"

FEATURE_NAMES: tuple[str, ...] = (
    "close",
    "volume",
    "returns_1",
    "rsi_14",
    "macd",
    "macd_signal",
    "atr_14",
    "bb_position",
    "ema_20",
    "ema_50",
    "zscore",
    "volume_ratio",
)

# Every parameter that changes a feature value; its hash is stored with each model.
FEATURE_PARAMS: dict[str, dict[str, float]] = {
    "rsi_14": {"period": 14},
    "macd": {"fast": 12, "slow": 26, "signal": 9},
    "macd_signal": {"fast": 12, "slow": 26, "signal": 9},
    "atr_14": {"period": 14},
    "bb_position": {"period": 20, "n_std": 2.0},
    "ema_20": {"period": 20},
    "ema_50": {"period": 50},
    "zscore": {"period": 20},
    "volume_ratio": {"period": 20},
}


def feature_spec() -> dict[str, object]:
    """The spec as data, read at call time so that it always describes the code."""
    return {"version": FEATURE_VERSION, "names": list(FEATURE_NAMES), "params": FEATURE_PARAMS}


def feature_spec_hash() -> str:
    canonical = json.dumps(feature_spec(), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
