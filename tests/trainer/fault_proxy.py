"""A TCP proxy on 127.0.0.1 that injects S3 outages: connection resets, on command.

It forwards bytes unchanged to a target (the moto server), so every client (boto3, pyarrow's
AWS SDK, Ray's storage calls) sees the real S3 API. During an outage it resets (RST, as a
crashed load balancer or a dropped NAT entry does) every open connection and every new one
the moment it is accepted, until the outage ends.

`outage(seconds)` starts one now; `arm(pattern, seconds)` starts one at the first request from a
client whose bytes match `pattern` (e.g. the PUT of a checkpoint shard), and resets that
request's connection before it reaches the server, so the outage certainly hits that request.
`arm(pattern, seconds, selective=True)` is a partial outage instead: for `seconds` from the
first match, only requests matching `pattern` are reset (one worker's uploads fail, the rest
of the traffic goes through).
"""

from __future__ import annotations

import re
import selectors
import socket
import struct
import threading
import time


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN (SO_LINGER on, timeout 0)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class FaultProxy:
    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._armed: tuple[re.Pattern, float, bool] | None = None
        self._selective: tuple[re.Pattern, float] | None = None  # (pattern, until)
        self._live: set[tuple[socket.socket, socket.socket]] = set()
        self.resets = 0  # connections reset by outages
        self.triggered_at: float | None = None  # monotonic time an armed outage began
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True, name="fault-proxy").start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def down(self) -> bool:
        return time.monotonic() < self._down_until

    def outage(self, seconds: float) -> None:
        with self._lock:
            self._down_until = time.monotonic() + seconds
            live, self._live = self._live, set()
            self.resets += len(live)
        for client, upstream in live:
            _reset(client)
            _reset(upstream)

    def arm(self, pattern: bytes, seconds: float, selective: bool = False) -> None:
        with self._lock:
            self._armed = (re.compile(pattern), seconds, selective)

    def heal(self) -> None:
        """End any outage now, and disarm."""
        with self._lock:
            self._down_until, self._selective, self._armed = 0.0, None, None

    def wait_until_up(self) -> None:
        while self.down() or (self._selective and time.monotonic() < self._selective[1]):
            time.sleep(0.1)

    def close(self) -> None:
        self._closed = True
        _reset(self._listener)
        self.outage(0)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.down():
                with self._lock:
                    self.resets += 1
                _reset(client)
                continue
            threading.Thread(target=self._pump, args=(client,), daemon=True).start()

    def _pump(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            _reset(client)
            return
        upstream.settimeout(None)
        pair = (client, upstream)
        with self._lock:
            self._live.add(pair)
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ, upstream)
        sel.register(upstream, selectors.EVENT_READ, client)
        try:
            while True:
                for key, _ in sel.select():
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    if key.fileobj is client and self._trigger(data):
                        _reset(client)
                        _reset(upstream)
                        return
                    key.data.sendall(data)
        except (OSError, ValueError):
            return  # reset by an outage, or the peer went away
        finally:
            sel.close()
            with self._lock:
                known = pair in self._live
                self._live.discard(pair)
            if known:
                client.close()
                upstream.close()

    def _trigger(self, data: bytes) -> bool:
        """True when `data` fires the armed outage or falls in a selective one (its connection is
        then reset unsent)."""
        with self._lock:
            selective = self._selective
            if selective and time.monotonic() < selective[1] and selective[0].search(data):
                self.resets += 1
                return True
            armed = self._armed
            if armed is None or not armed[0].search(data):
                return False
            self._armed = None
            self.triggered_at = time.monotonic()
            if armed[2]:
                self._selective = (armed[0], self.triggered_at + armed[1])
                self.resets += 1
                return True
        self.outage(armed[1])
        return True
