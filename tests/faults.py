"""A TCP proxy on 127.0.0.1 that breaks connections on purpose, for the
reconnect tests (tests/test_reconnect.py) and bench/faults.py.

    proxy = FaultProxy(host_port)      # clients connect to proxy.port
    proxy.cut()       # every connection through it ends (FIN both ways)
    proxy.reset()     # every connection through it is reset (RST)
    proxy.pause(0.5)  # nothing moves either way for 0.5 s; then it goes on
    proxy.refusing = True   # new connections are closed at once
    proxy.rate = 4 << 20    # at most this many bytes a second each way (0: no cap)
    proxy.close()

Each connection is a pair of sockets and two pump threads; every thread
and socket is its own and ends with `close()`. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time

LOOPBACK = "127.0.0.1"
_POLL_S = 0.05


class FaultProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server((LOOPBACK, 0))
        self.listener.settimeout(_POLL_S)
        self.port = self.listener.getsockname()[1]
        self.refusing = False
        self.rate = 0                       # bytes a second each way, 0 = no cap
        self.accepted = 0                   # connections that went through
        self.faults = 0                     # cuts, resets and pauses done
        self._paused_until = 0.0
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._closed = threading.Event()
        self._threads = [threading.Thread(target=self._accept, name="proxy-accept",
                                          daemon=True)]
        self._threads[0].start()

    # --- faults ---

    def cut(self) -> None:
        for client, upstream in self._take_pairs():
            for sock in (client, upstream):
                _quietly(sock.shutdown, socket.SHUT_RDWR)
                _quietly(sock.close)
        self.faults += 1

    def reset(self) -> None:
        for client, upstream in self._take_pairs():
            for sock in (client, upstream):
                _quietly(sock.setsockopt, socket.SOL_SOCKET, socket.SO_LINGER,
                         struct.pack("ii", 1, 0))
                _quietly(sock.close)
        self.faults += 1

    def pause(self, seconds: float) -> None:
        self._paused_until = time.monotonic() + seconds
        self.faults += 1

    def close(self) -> None:
        self._closed.set()
        self.cut()
        _quietly(self.listener.close)
        for thread in self._threads:
            thread.join(5)

    # --- inside ---

    def _take_pairs(self) -> list[tuple[socket.socket, socket.socket]]:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        return pairs

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection((LOOPBACK, self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            self.accepted += 1
            for sock in (client, upstream):     # before a pump or a cut can close them
                sock.settimeout(None)       # blocking: a slow reader slows the pump
            with self._lock:
                self._pairs.append((client, upstream))
            for source, sink, name in ((client, upstream, "up"), (upstream, client, "down")):
                thread = threading.Thread(target=self._pump, args=(source, sink),
                                          name=f"proxy-{name}", daemon=True)
                self._threads.append(thread)
                thread.start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while not self._closed.is_set():
                wait = self._paused_until - time.monotonic()
                if wait > 0:                # paused: leave the bytes where they are
                    time.sleep(min(wait, _POLL_S))
                    continue
                readable, _, _ = select.select([source], [], [], _POLL_S)
                if not readable:
                    continue
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
                if self.rate:               # a slow network, roughly
                    time.sleep(len(data) / self.rate)
        except (OSError, ValueError):       # cut or reset meanwhile (a closed socket)
            pass
        finally:
            for sock in (source, sink):
                _quietly(sock.shutdown, socket.SHUT_RDWR)
                _quietly(sock.close)


def _quietly(function, *args) -> None:
    try:
        function(*args)
    except OSError:
        pass
