"""A TCP forwarder that can freeze its connections, for watch-stall tests.

``freeze()`` stalls every connection open at that moment: no byte is read or written on either side any more,
and both sockets stay open - what a dropped NAT entry or a hung middlebox looks like to a client and a server.
Connections opened afterwards pass normally, so a client that notices the stall and reconnects recovers;
``freeze(hold_new=True)`` freezes them too (a black hole: connects succeed, nothing comes back) until
``release()``. TLS passes through untouched.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from dataclasses import dataclass, field


@dataclass
class _Pair:
    client: socket.socket
    upstream: socket.socket
    frozen: threading.Event = field(default_factory=threading.Event)


class FreezableProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1", port: int = 0) -> None:
        """``port``: listen there (a proxy closed, then opened again on its port: an API that comes back)."""
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port = self._listener.getsockname()[1]
        self._pairs: list[_Pair] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._hold_new = threading.Event()
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                continue
            upstream.settimeout(None)
            pair = _Pair(conn, upstream)
            if self._hold_new.is_set():
                pair.frozen.set()
            with self._lock:
                self._pairs.append(pair)
                self.accepted += 1
            threading.Thread(target=self._pump, args=(pair,), daemon=True, name="proxy-pump").start()

    def _pump(self, pair: _Pair) -> None:
        other = {pair.client: pair.upstream, pair.upstream: pair.client}
        with selectors.DefaultSelector() as sel:
            sel.register(pair.client, selectors.EVENT_READ)
            sel.register(pair.upstream, selectors.EVENT_READ)
            while not self._closed.is_set():
                if pair.frozen.is_set():
                    self._closed.wait(0.5)  # frozen: keep both sockets open, move nothing
                    continue
                for key, _ in sel.select(timeout=0.2):
                    if pair.frozen.is_set():  # frozen while select waited: leave the bytes where they are
                        break
                    try:
                        data = key.fileobj.recv(65536)
                        if not data:
                            return self._close(pair)
                        other[key.fileobj].sendall(data)
                    except OSError:
                        return self._close(pair)
        self._close(pair)

    def _close(self, pair: _Pair) -> None:
        for sock in (pair.client, pair.upstream):
            with contextlib.suppress(OSError):
                sock.close()
        with self._lock:
            if pair in self._pairs:
                self._pairs.remove(pair)

    def freeze(self, hold_new: bool = False) -> int:
        """Freeze every open connection (and, with ``hold_new``, every one opened until ``release()``);
        returns how many were open."""
        if hold_new:
            self._hold_new.set()
        with self._lock:
            for pair in self._pairs:
                pair.frozen.set()
            return len(self._pairs)

    def release(self) -> None:
        """Connections opened from now on pass again (the frozen ones stay frozen)."""
        self._hold_new.clear()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            # shutdown first: close() alone leaves the port listening while the accept thread is blocked in it
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            self._close(pair)
