"""The trading rule: the position the bot holds, from P(up) and the position it holds now.

Long or flat, since bitbank spot has no shorting. A flat rule enters when P(up) >= `entry`; a long one stays
long while P(up) >= `exit`, with exit <= entry, and in any case for its first `min_hold` bars. The gap between
entry and exit is hysteresis, and the minimum holding time a second guard: a P(up) hovering at one cut-off would
otherwise pay a fee on each side every few bars. A rule may also never enter (`TradingRule.flat()`), the right
choice when no candidate made money after costs before it was chosen.

What the bot holds is a `Holding`: the position and for how many bars it has held it (1 on the bar it enters).

`transition` is the rule's one implementation. The walk-forward search (cryptoml.model.trading) calls it on
arrays of candidate thresholds, and the backtest, `ServingModel`, the bot and `cryptoml predict` call it through
`TradingRule`. This module imports only numpy, so a bot's process stays small.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FLAT, LONG = 0, 1


def transition(position: Any, held: Any, p_up: Any, entry: Any, exit: Any, min_hold: Any) -> tuple[np.ndarray, np.ndarray]:
    """The (position, bars held) after a bar with this P(up): long if already long and either P(up) >= exit or
    fewer than min_hold bars held, or if flat and P(up) >= entry; flat otherwise. Element-wise over numpy arrays
    (one candidate rule per element) or on scalars. An entry of +inf never enters.
    """
    was_long = np.equal(position, LONG)
    stays = np.greater_equal(p_up, exit) | np.less(held, min_hold)
    long = np.where(was_long, stays, np.greater_equal(p_up, entry))
    return long.astype(np.int64), np.where(long, np.where(was_long, np.add(held, 1), 1), 0).astype(np.int64)


@dataclass(frozen=True)
class Holding:
    """The position held (FLAT or LONG) and the bars it has been held: 0 when flat, 1 on the bar it was entered."""

    position: int = FLAT
    bars: int = 0

    def __post_init__(self) -> None:
        if self.position not in (FLAT, LONG) or isinstance(self.position, bool):
            raise ValueError(f"position must be {FLAT} (flat) or {LONG} (long), got {self.position!r}")
        if not isinstance(self.bars, int) or (self.bars < 1 if self.position == LONG else self.bars != 0):
            raise ValueError(f"a {'long' if self.position else 'flat'} holding has {'>= 1' if self.position else '0'} bars held, got {self.bars!r}")


@dataclass(frozen=True)
class TradingRule:
    """Enter when P(up) >= entry, leave when P(up) < exit after at least min_hold bars; `entry` None never enters."""

    entry: float | None
    exit: float | None
    min_hold: int = 1

    def __post_init__(self) -> None:
        if (self.entry is None) != (self.exit is None):
            raise ValueError(f"a trading rule has both entry and exit, or neither (flat); got entry={self.entry}, exit={self.exit}")
        if self.entry is not None and self.exit is not None:
            for name, value in (("entry", self.entry), ("exit", self.exit)):
                if not (isinstance(value, int | float) and not isinstance(value, bool) and 0.0 < value <= 1.0):
                    raise ValueError(f"trading rule {name} must be a P(up) in (0, 1], got {value!r}")
            if self.exit > self.entry:
                raise ValueError(f"trading rule exit ({self.exit}) must be at most its entry ({self.entry}): a long exits below where it entered")
        if isinstance(self.min_hold, bool) or not isinstance(self.min_hold, int) or self.min_hold < 1:
            raise ValueError(f"trading rule min_hold must be a whole number of bars >= 1, got {self.min_hold!r}")

    @classmethod
    def flat(cls) -> TradingRule:
        return cls(entry=None, exit=None)

    @classmethod
    def threshold(cls, threshold: float) -> TradingRule:
        """Long exactly while P(up) >= threshold: how models saved before trading rules were served."""
        return cls(entry=threshold, exit=threshold, min_hold=1)

    @property
    def trades(self) -> bool:
        return self.entry is not None

    def _thresholds(self) -> tuple[float, float]:
        return (math.inf, math.inf) if self.entry is None or self.exit is None else (self.entry, self.exit)

    def next_holding(self, p_up: float, holding: Holding) -> Holding:
        """What to hold for the next bar, given this closed bar's P(up) and what is held now."""
        if not 0.0 <= p_up <= 1.0:  # also refuses NaN
            raise ValueError(f"P(up) must be a probability in [0, 1], got {p_up!r}")
        entry, exit = self._thresholds()
        position, bars = transition(holding.position, holding.bars, p_up, entry, exit, self.min_hold)
        return Holding(int(position), int(bars))

    def holdings(self, p_up: Sequence[float] | np.ndarray, holding: Holding = Holding()) -> tuple[np.ndarray, Holding]:
        """The position after each P(up) of a series, starting from `holding`: next_holding, bar after bar; and the
        holding after the last bar."""
        positions = np.empty(len(p_up), dtype=np.int64)
        for row, probability in enumerate(p_up):
            holding = self.next_holding(float(probability), holding)
            positions[row] = holding.position
        return positions, holding

    def as_json(self) -> dict[str, Any]:
        return {"entry": self.entry, "exit": self.exit, "min_hold": self.min_hold}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> TradingRule:
        """The rule stored at `where` (a manifest key); ValueError naming it if the values are not a rule."""
        if not isinstance(data, Mapping) or set(data) != {"entry", "exit", "min_hold"}:
            raise ValueError(f"{where} must be an object with keys entry, exit and min_hold, got {data!r}")
        try:
            return cls(entry=data["entry"], exit=data["exit"], min_hold=data["min_hold"])
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    def describe(self) -> str:
        if self.entry is None:
            return "flat (never enters)"
        hold = f", held at least {self.min_hold} bars" if self.min_hold > 1 else ""
        return f"long from P(up) >= {self.entry:g} until P(up) < {self.exit:g}{hold}"
