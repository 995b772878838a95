"""The paper bot's step and process, beside today's path (generate_latest + ServingModel), in one run.

    python bench/bot.py [MODEL_DIR] [--candles 3000]

MODEL_DIR defaults to models/production (`make repro` makes it). Candles: the pipeline's synthetic source (1h, seed 7),
LIVE_WINDOW of history, then --candles more. Each path runs in a fresh process that imports only what it needs,
times each candle's step with perf_counter, and reads its own peak RSS from VmHWM in /proc/self/status (getrusage's
ru_maxrss in a child of this big process would report this process's high-water mark):

* bot step: what cryptoml.live.bot does per candle, without the journal: FeatureState.update, P(up) from
  ServingModel, the model's rule (next_holding). Then the same loop through PaperBot.step (reload check, skip checks,
  P&L, one JSON line appended, no fsync) over a ReplayFeed, as `cryptoml bot --paper --replay` runs it.
* today's path: FeatureManager.generate_latest on the last LIVE_WINDOW candles (ccxt rows), then the same model and
  rule (pandas and numba in the process).
* `cryptoml bot --paper --replay` itself (typer, the CLI), and a bot with ccxt in its process (an ExchangeFeed made,
  its bitbank client built), beside `import ccxt` and `import numpy` alone.

The machine may be shared: the load average is printed, and the figures are indicative. The last line is the bot's
step on the default model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cryptoml.candles.synthetic import simulate_candles
from cryptoml.features.manager import LIVE_WINDOW

TARGET_P50_MS, TARGET_P99_MS, TARGET_RSS_MB = 0.3, 2.0, 150.0
WARMUP = 20

_HEAD = """
import json, sys, time
from pathlib import Path

def peak_rss_mb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024

def report(milliseconds, **extra):
    print(json.dumps({"ms": milliseconds, "peak_rss_mb": peak_rss_mb(), **extra}))

csv, model_dir, window = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
"""
PROCESSES = {
    "bot step (FeatureState, ServingModel, rule)": _HEAD + """
from cryptoml.features.state import FeatureState
from cryptoml.live.feed import ReplayFeed
from cryptoml.live.serving import ServingModel
from cryptoml.model.rule import Holding
feed = ReplayFeed(csv, 3_600_000)
history = feed.start(window)
model, state, holding = ServingModel.load(model_dir), FeatureState.seed(history, 3_600_000), Holding()
milliseconds = []
while (candles := feed.poll(0)):
    start = time.perf_counter()
    row = state.update(candles[0])
    holding = model.next_holding(float(model.predict_proba(row[None, :])[0, 1]), holding)
    milliseconds.append((time.perf_counter() - start) * 1e3)
report(milliseconds)
""",
    "PaperBot.step (the same + reload check, P&L, journal line)": _HEAD + """
from cryptoml.live.bot import BotSettings, PaperBot
from cryptoml.live.feed import ReplayFeed
from cryptoml.live.journal import Journal
feed = ReplayFeed(csv, 3_600_000)
journal = Journal(Path(sys.argv[4]), {"feed": feed.name}, fsync=False)
bot = PaperBot(feed, journal, model_dir, BotSettings())
bot.start()
milliseconds = []
while (candles := feed.poll(0)):
    start = time.perf_counter()
    bot.step(candles[0])
    milliseconds.append((time.perf_counter() - start) * 1e3)
report(milliseconds)
""",
    "today's path (generate_latest, ServingModel, rule)": _HEAD + """
from cryptoml.features.manager import FeatureManager
from cryptoml.live.feed import ReplayFeed
from cryptoml.live.serving import ServingModel
from cryptoml.model.rule import Holding
feed = ReplayFeed(csv, 3_600_000)
rows = feed.start(window)
model, manager, holding = ServingModel.load(model_dir), FeatureManager(), Holding()
manager.generate_latest(rows)  # numba's compile or cache load, not timed
milliseconds = []
while (candles := feed.poll(0)):
    rows = [*rows[1:], candles[0]]
    start = time.perf_counter()
    row = manager.generate_latest(rows)
    holding = model.next_holding(float(model.predict_proba(row)[0, 1]), holding)
    milliseconds.append((time.perf_counter() - start) * 1e3)
report(milliseconds)
""",
}
# Peak RSS only: the real command, a bot with ccxt, and the floors.
RSS_PROCESSES = {
    "cryptoml bot --paper --replay (the CLI, typer)": _HEAD + """
from cryptoml.cli import app
try:
    app(["bot", "--paper", "--replay", str(csv), "--journal", sys.argv[4], "--model", str(model_dir)])
except SystemExit as exit:
    assert not exit.code, exit.code
report([])
""",
    "a bot with ccxt in its process (ExchangeFeed made)": _HEAD + """
import cryptoml.candles.ccxt_client as ccxt_client
from cryptoml.live.feed import ExchangeFeed, ReplayFeed
from cryptoml.live.serving import ServingModel
from cryptoml.features.state import FeatureState
feed = ExchangeFeed("bitbank", "BTC/JPY", "1h")  # builds the client; no request is made
model = ServingModel.load(model_dir)
state = FeatureState.seed(ReplayFeed(csv, 3_600_000).start(window), 3_600_000)
model.predict_proba(state.features[None, :])
report([])
""",
    "import ccxt alone": _HEAD + "import ccxt\nreport([])\n",
    "import numpy alone (the floor)": _HEAD + "import numpy\nreport([])\n",
}


def write_candles(path: Path, candles: int) -> None:
    start = pd.Timestamp("2022-01-01", tz="UTC")
    frame = simulate_candles(start, start + pd.Timedelta(hours=LIVE_WINDOW + candles), "1h", seed=7)
    frame.assign(timestamp=frame["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")).to_csv(path, index=False)


def fresh(script: str, csv: Path, model_dir: Path, scratch: Path) -> dict:
    journal = scratch / f"journal-{time.monotonic_ns()}.jsonl"
    command = [sys.executable, "-c", script, str(csv), str(model_dir), str(LIVE_WINDOW), str(journal)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def verdict(passed: bool) -> str:
    return "meets" if passed else "MISSES"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", nargs="?", type=Path, default=Path("models/production"))
    parser.add_argument("--candles", type=int, default=3_000, help="candles stepped through after LIVE_WINDOW of history")
    args = parser.parse_args()
    if not (args.model_dir / "ensemble.json").is_file():
        parser.error(f"{args.model_dir} holds no model: run `make repro` first")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (a shared machine slows every figure)")
    with tempfile.TemporaryDirectory() as scratch:
        csv = Path(scratch) / "candles.csv"
        write_candles(csv, args.candles)
        print(f"\nper candle, fresh processes, {args.candles - WARMUP} candles after {WARMUP} warm-up ({args.model_dir})")
        figures = {}
        for name, script in PROCESSES.items():
            result = fresh(script, csv, args.model_dir, Path(scratch))
            p50, p99 = np.percentile(result["ms"][WARMUP:], [50, 99])
            figures[name] = (p50, p99, result["peak_rss_mb"])
            print(f"  {name:60s} p50 {p50:7.3f} ms   p99 {p99:7.3f} ms   peak RSS {result['peak_rss_mb']:5.0f} MB")
        print("\npeak RSS of whole processes")
        for name, script in RSS_PROCESSES.items():
            print(f"  {name:60s} {fresh(script, csv, args.model_dir, Path(scratch))['peak_rss_mb']:5.0f} MB")
    step_p50, step_p99, step_rss = figures["bot step (FeatureState, ServingModel, rule)"]
    today_p50, today_p99, today_rss = figures["today's path (generate_latest, ServingModel, rule)"]
    print(f"\ntoday's path / bot step: p50 {today_p50 / step_p50:.0f}x, p99 {today_p99 / step_p99:.0f}x, peak RSS {today_rss - step_rss:+.0f} MB")
    print(f"targets: p50 <= {TARGET_P50_MS} ms {verdict(step_p50 <= TARGET_P50_MS)}, p99 <= {TARGET_P99_MS} ms "
          f"{verdict(step_p99 <= TARGET_P99_MS)}, peak RSS <= {TARGET_RSS_MB:.0f} MB {verdict(step_rss <= TARGET_RSS_MB)}")
    print(f"today's path: p50 {today_p50:.3f} ms, p99 {today_p99:.3f} ms, peak RSS {today_rss:.0f} MB")
    print(f"bot step: p50 {step_p50:.3f} ms, p99 {step_p99:.3f} ms, peak RSS {step_rss:.0f} MB")


if __name__ == "__main__":
    main()
