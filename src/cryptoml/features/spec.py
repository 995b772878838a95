"""What the 12 features are: names, parameters and version, whose hash every model records.

Apart from cryptoml.features.manager (numba, pandas) so that checking a model's feature spec at load costs no
heavy import; cryptoml.features.manager and cryptoml.features.state compute the values from these same constants,
read through the functions below at call time (so a changed parameter changes the values and the hash together).
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


def parameter(feature: str, name: str = "period") -> int:
    """An integer parameter of a feature."""
    return int(FEATURE_PARAMS[feature][name])


def recursion_periods() -> tuple[int, int, int, int, int, int, int]:
    """The periods of the recursive features, in the order cryptoml.features.kernels takes them: RSI and ATR
    (Wilder smoothing), MACD fast, slow and signal, the short and the long EMA."""
    return (
        parameter("rsi_14"),
        parameter("atr_14"),
        parameter("macd", "fast"),
        parameter("macd", "slow"),
        parameter("macd", "signal"),
        parameter("ema_20"),
        parameter("ema_50"),
    )


def window_periods() -> tuple[int, int, int]:
    """The rolling windows of zscore, bb_position and volume_ratio, in the order cryptoml.features.kernels uses."""
    return parameter("zscore"), parameter("bb_position"), parameter("volume_ratio")


def band_n_std() -> float:
    """The Bollinger bands' half-width in population standard deviations."""
    return float(FEATURE_PARAMS["bb_position"]["n_std"])


def lookbacks() -> dict[str, int]:
    """Row of each feature's first defined value (TA-Lib's lookback)."""
    _, _, _, slow, signal, _, _ = recursion_periods()
    return {
        "close": 0,
        "volume": 0,
        "returns_1": 1,
        "rsi_14": parameter("rsi_14"),
        "macd": slow - 1 + signal - 1,
        "macd_signal": slow - 1 + signal - 1,
        "atr_14": parameter("atr_14"),
        "bb_position": parameter("bb_position") - 1,
        "ema_20": parameter("ema_20") - 1,
        "ema_50": parameter("ema_50") - 1,
        "zscore": parameter("zscore") - 1,
        "volume_ratio": parameter("volume_ratio") - 1,
    }


def warmup_rows() -> int:
    """Candles before the first row on which every feature is defined: that row is candle `warmup_rows()` (from 0)."""
    return max(lookbacks().values())
