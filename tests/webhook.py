"""A webhook receiver on 127.0.0.1 that records the JSON bodies POSTed to it, to test alerts end to end."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# A path like Discord's /api/webhooks/<id>/<token>: the token is the secret no output may contain.
SECRET_PATH = "/api/webhooks/4242/s3cr3t-t0ken-never-logged"


@dataclass
class Receiver:
    url: str
    posts: list[Any] = field(default_factory=list)


@contextmanager
def webhook_receiver() -> Iterator[Receiver]:
    """Serve until the block ends; every POST to the secret path is parsed and appended to `posts`."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            known = self.path == SECRET_PATH
            if known:
                receiver.posts.append(json.loads(body))
            self.send_response(204 if known else 404)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            """Silent: pytest output is for failures, not access logs."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver = Receiver(f"http://127.0.0.1:{server.server_address[1]}{SECRET_PATH}")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def unused_port() -> int:
    """A port of 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def unreachable_url() -> str:
    """A webhook URL with the same secret path on a port nothing listens on."""
    return f"http://127.0.0.1:{unused_port()}{SECRET_PATH}"
