"""A TCP proxy on 127.0.0.1 that goes down in the middle of a transfer, to test storage outages end to end.

Clients connect to the proxy's port as if it were the server. After `cut_after` bytes from clients it drops
every connection and stops listening, as a crashed server does: a request in flight is cut half-way, new
ones are refused. `resume()` listens again on the same port (the server is back).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_CHUNK = 16 * 1024


class CuttingProxy:
    def __init__(self, backend_port: int, cut_after: int | None) -> None:
        self.backend_port = backend_port
        self.cut_after = cut_after
        self.forwarded = 0  # bytes from clients passed on
        self.cut = threading.Event()
        self._lock = threading.Lock()
        self._connections: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = self._listen(0)
        self.port = int(self._listener.getsockname()[1])
        self._start(self._accept, self._listener)

    def _listen(self, port: int) -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        return listener

    def _start(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # the listener was closed: the server is down
                return
            backend = socket.create_connection(("127.0.0.1", self.backend_port))
            with self._lock:
                self._connections += [client, backend]
            self._start(self._pump, client, backend, True)
            self._start(self._pump, backend, client, False)

    def _pump(self, source: socket.socket, target: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(_CHUNK):
                if from_client and not self._allow(len(data)):
                    return
                target.sendall(data)
        except OSError:
            pass  # the other direction, or the cut, closed a socket
        finally:
            for end in (source, target):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _allow(self, size: int) -> bool:
        """Count bytes from clients; crossing `cut_after` takes the server down before they are passed on."""
        with self._lock:
            if self.cut.is_set():
                return False
            self.forwarded += size
            if self.cut_after is None or self.forwarded < self.cut_after:
                return True
        self.go_down()
        return False

    def go_down(self) -> None:
        """Refuse new connections and cut every open one."""
        self.cut.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked in another thread (Linux)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()

    def resume(self) -> None:
        """Listen again on the same port, with no further cut."""
        self.cut_after = None
        self._listener = self._listen(self.port)
        self.cut.clear()
        self._start(self._accept, self._listener)


@contextmanager
def cutting_proxy(backend_port: int, cut_after: int | None) -> Iterator[CuttingProxy]:
    """A proxy to 127.0.0.1:`backend_port`, closed with all its connections when the block ends."""
    proxy = CuttingProxy(backend_port, cut_after)
    try:
        yield proxy
    finally:
        proxy.go_down()
        for thread in proxy._threads:
            thread.join(timeout=5)
