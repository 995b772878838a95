"""A local fake of bitbank's public candlestick API, so ccxt can be driven end to end offline.

It answers what ccxt's bitbank client asks for a candle fetch, in bitbank's own format:
`GET /spot/pairs` (markets) and `GET /{pair}/candlestick/{type}/{YYYYMMDD}` (one UTC day, values
as strings, open time in ms last). Faults are scripted per path (`fail`), requests are counted.

In-process (tests)::

    with FakeBitbank(candles) as fake:
        fetch_exchange_candles(..., api_url=fake.url)
        fake.request_count(fake.candle_path(day))

Standalone (subprocess / DVC end-to-end tests), until SIGTERM or SIGINT::

    python tests/fake_exchange.py --csv candles.csv --port-file port.txt \
        [--fail /btc_jpy/candlestick/1hour/20240102:429:2]

The request counts are then served as JSON at `/__fake__/requests`.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

import pandas as pd

MARKETS_PATH = "/spot/pairs"
REQUESTS_PATH = "/__fake__/requests"
# bitbank's error code for an unknown URL; the fake answers it for any path it does not serve.
URL_NOT_FOUND_CODE = 10000
# How often the serving thread checks for stop(): short, so tests do not wait on teardown.
POLL_SECONDS = 0.02
# Candle types bitbank serves one UTC day at a time (YYYYMMDD); longer ones are per year (YYYY).
DAILY_CANDLE_TYPES = ("1min", "5min", "15min", "30min", "1hour")

Response = tuple[int, str, bytes]


@dataclass
class _Fault:
    status: int | None  # None: answer normally, after delay_seconds
    remaining: int
    bitbank_code: int | None
    delay_seconds: float = 0.0


class FakeBitbank:
    """Serves a candle frame (the candle frame contract) as bitbank would, on 127.0.0.1."""

    def __init__(
        self, candles: pd.DataFrame, *, pair: str = "btc_jpy", candle_type: str = "1hour"
    ) -> None:
        if candle_type not in DAILY_CANDLE_TYPES:
            raise ValueError(
                f"candle_type {candle_type!r} is not served per day; expected one of {DAILY_CANDLE_TYPES}"
            )
        self.pair = pair
        self.candle_type = candle_type
        self._days = _bitbank_rows_by_day(candles)
        self._lock = threading.Lock()
        self._requests: Counter[str] = Counter()
        self._faults: dict[str, _Fault] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> FakeBitbank:
        """Bind a free port on 127.0.0.1 and serve from a daemon thread."""
        if self._server is not None:
            raise RuntimeError("FakeBitbank is already running")
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": POLL_SECONDS}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server, self._thread = None, None

    def __enter__(self) -> FakeBitbank:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeBitbank is not running: call start() or use it in a with block")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL to give ccxt in place of https://public.bitbank.cc and https://api.bitbank.cc."""
        return f"http://127.0.0.1:{self.port}"

    # --- scripting and inspection -------------------------------------------------------------
    def candle_path(self, day: pd.Timestamp) -> str:
        """The path ccxt requests for the UTC day holding `day`."""
        return f"/{self.pair}/candlestick/{self.candle_type}/{day.tz_convert('UTC'):%Y%m%d}"

    def fail(self, path: str, status: int, times: int = 1, bitbank_code: int | None = None) -> None:
        """Answer the next `times` requests for `path` with HTTP `status`.

        The body is bitbank's JSON error `{"success":0,"data":{"code":...}}` when `bitbank_code`
        is given, else plain text as a load balancer or rate limiter in front of it would send.
        """
        with self._lock:
            self._faults[path] = _Fault(status, times, bitbank_code)

    def slow(self, path: str, seconds: float, times: int = 1) -> None:
        """Answer the next `times` requests for `path` correctly, but only after `seconds` (a slow exchange)."""
        with self._lock:
            self._faults[path] = _Fault(None, times, None, seconds)

    def request_count(self, path: str) -> int:
        with self._lock:
            return self._requests[path]

    def request_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._requests)

    # --- serving -----------------------------------------------------------------------------
    def respond(self, path: str) -> Response:
        """(status, content type, body) for a GET of `path`; counts it and applies faults."""
        if path == REQUESTS_PATH:
            return _json_response(HTTPStatus.OK, self.request_counts())
        with self._lock:
            self._requests[path] += 1
            fault = self._faults.get(path)
            delay = 0.0
            if fault is not None and fault.remaining > 0:
                fault.remaining -= 1
                if fault.status is not None:
                    return _fault_response(fault)
                delay = fault.delay_seconds
        time.sleep(delay)
        if path == MARKETS_PATH:
            return _json_response(HTTPStatus.OK, _success({"pairs": [_pair_info(self.pair)]}))
        return self._candles_response(path)

    def _candles_response(self, path: str) -> Response:
        parts = path.strip("/").split("/")
        is_candle_path = (
            len(parts) == 4
            and parts[:3] == [self.pair, "candlestick", self.candle_type]
            and len(parts[3]) == 8
            and parts[3].isdigit()
        )
        if not is_candle_path:
            return _json_response(HTTPStatus.NOT_FOUND, _bitbank_error(URL_NOT_FOUND_CODE))
        rows = self._days.get(parts[3], [])
        return _json_response(
            HTTPStatus.OK,
            _success({"candlestick": [{"type": self.candle_type, "ohlcv": rows}]}),
        )


def _handler_for(fake: FakeBitbank) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            status, content_type, body = fake.respond(urlsplit(self.path).path)
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timeout test): nothing to answer

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            """Silent: pytest output is for failures, not access logs."""

    return Handler


def _bitbank_rows_by_day(candles: pd.DataFrame) -> dict[str, list[list[str | int]]]:
    """Candles grouped by UTC day (YYYYMMDD), each as bitbank's [o, h, l, c, v, open_ms] row.

    Prices and volume are strings like bitbank's; repr() keeps every float64 exact.
    """
    timestamps = pd.to_datetime(candles["timestamp"], utc=True)
    open_ms = (timestamps - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)
    days: dict[str, list[list[str | int]]] = {}
    for day, row_open_ms, *values in zip(
        timestamps.dt.strftime("%Y%m%d"),
        open_ms,
        *(candles[column] for column in ("open", "high", "low", "close", "volume")),
        strict=True,
    ):
        days.setdefault(day, []).append([*(repr(float(value)) for value in values), int(row_open_ms)])
    return days


def _pair_info(pair: str) -> dict[str, object]:
    """One entry of bitbank's /spot/pairs, with the fields ccxt's parse_market reads."""
    base, quote = pair.split("_")
    return {
        "name": pair,
        "base_asset": base,
        "quote_asset": quote,
        "maker_fee_rate_base": "0",
        "taker_fee_rate_base": "0",
        "maker_fee_rate_quote": "-0.0002",
        "taker_fee_rate_quote": "0.0012",
        "unit_amount": "0.0001",
        "limit_max_amount": "1000",
        "market_max_amount": "10",
        "market_allowance_rate": "0.2",
        "price_digits": 0,
        "amount_digits": 4,
        "is_enabled": True,
        "stop_order": False,
        "stop_order_and_cancel": False,
    }


def _success(data: dict[str, object]) -> dict[str, object]:
    return {"success": 1, "data": {**data, "timestamp": int(time.time() * 1000)}}


def _bitbank_error(code: int) -> dict[str, object]:
    return {"success": 0, "data": {"code": code}}


def _json_response(status: int, payload: object) -> Response:
    return int(status), "application/json", json.dumps(payload).encode()


def _fault_response(fault: _Fault) -> Response:
    if fault.bitbank_code is not None:
        return _json_response(fault.status, _bitbank_error(fault.bitbank_code))
    reason = HTTPStatus(fault.status).phrase
    return fault.status, "text/plain", f"{fault.status} {reason}".encode()


def read_candle_csv(path: Path) -> pd.DataFrame:
    """A candle CSV (timestamp ISO-8601 UTC, open, high, low, close, volume) as a frame."""
    candles = pd.read_csv(path)
    candles["timestamp"] = pd.to_datetime(candles["timestamp"], utc=True).astype("datetime64[ns, UTC]")
    return candles


def _parse_fault(spec: str) -> tuple[str, int, int]:
    """PATH:STATUS:TIMES -> (path, status, times)."""
    path, status, times = spec.rsplit(":", 2)
    return path, int(status), int(times)


def main(argv: list[str] | None = None) -> None:
    """Serve a candle CSV until SIGTERM/SIGINT; the bound port is written to --port-file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, required=True, help="candles to serve")
    parser.add_argument("--port-file", type=Path, required=True, help="written once listening")
    parser.add_argument("--pair", default="btc_jpy")
    parser.add_argument("--candle-type", default="1hour", choices=DAILY_CANDLE_TYPES)
    parser.add_argument(
        "--fail", action="append", default=[], type=_parse_fault, metavar="PATH:STATUS:TIMES",
        help="answer the first TIMES requests for PATH with HTTP STATUS (repeatable)",
    )
    args = parser.parse_args(argv)

    stop_requested = threading.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, lambda *_: stop_requested.set())
    with FakeBitbank(read_candle_csv(args.csv), pair=args.pair, candle_type=args.candle_type) as fake:
        for path, status, times in args.fail:
            fake.fail(path, status, times)
        # Written then renamed, so a reader polling for the file never sees it half-written.
        partial = args.port_file.with_name(args.port_file.name + ".partial")
        partial.write_text(str(fake.port))
        partial.replace(args.port_file)
        stop_requested.wait()


if __name__ == "__main__":
    main()
