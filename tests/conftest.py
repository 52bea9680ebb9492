"""Helpers for end-to-end tests that drive chatroom.py as subprocesses.

Everything listens and connects on 127.0.0.1 only; hosts never advertise on
mDNS. Every process a test starts is ended by the fixture that started it
(by PID, through its Popen object).

- `start_host(*flags)` -> HostProcess (`.port`, `.proc`, `.stop(signum=SIGINT)`)
- `host`                -> a HostProcess with the default limits
- `join(port, room, user, *flags, json_mode=True, ready=True)` -> Client
  (`.ready` holds the `ready` event when ready=True)
- `Client.send(line)`, `.send_bytes(b)`, `.close_stdin()`, `.wait()` -> status,
  `.wait_for(type | substring | predicate)`, `.next()`, `.mark()` and
  `.between(mark)` (what arrived before the last match), `.seen()`
- `make_host(name, **limits)` -> an in-process chatroom.Host on 127.0.0.1 (async)
- `raw_connect(port)` -> socket (TLS without checking the key, as hosts
  speak TLS unless started with --insecure: see INSECURE_PORTS); `frame`,
  `frame_json`, `read_frame`, `read_frame_until`, `raw_login`,
  `wait_closed`: a raw protocol peer

Timeouts are failure deadlines only; no test asserts how fast anything is.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import chatroom

CHATROOM = Path(__file__).resolve().parent.parent / "chatroom.py"
PROGRAM = [sys.executable, str(CHATROOM)]   # tests of the built executable pass another
LOOPBACK = "127.0.0.1"
DEFAULT_TIMEOUT = 30.0          # a failure deadline, never a performance promise: a loaded
                                # CI machine took over 10 s to start a client (numpy, PyAV)

Predicate = Callable[[Any], bool]
INSECURE_PORTS: set[int] = set()    # hosts started with --insecure: raw peers speak plain TCP


_CONFIG_HOME = tempfile.mkdtemp(prefix="chatroom-test-config-")


def child_env() -> dict[str, str]:
    """The environment of a chatroom process a test starts."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # Each run's config folder (settings, places kept after a crash) is its
    # own, never the person's running the tests.
    env.setdefault("XDG_CONFIG_HOME", _CONFIG_HOME)
    return env


def _describe(items: list[Any], limit: int = 40) -> str:
    shown = items[-limit:]
    head = f"... ({len(items) - limit} earlier not shown)\n" if len(items) > limit else ""
    return head + "\n".join(f"  {item!r}"[:400] for item in shown) if shown else "  (nothing)"


class ChatProcess:
    """A chatroom.py subprocess whose stdout is read by a background thread.

    In JSON mode each stdout line becomes a dict (a line that is not a JSON
    object becomes {"type": "<not json>", "raw": line}); otherwise each line
    is kept as a str. `items` holds everything seen, in order; `wait_for`
    scans forward from a cursor, so successive waits observe the order in
    which things arrived.
    """

    def __init__(self, args: list[str], *, json_mode: bool = True, label: str = "",
                 program: list[str] | None = None) -> None:
        self.args = args
        self.json_mode = json_mode
        self.label = label or " ".join(args)
        self.proc = subprocess.Popen(
            [*(program or PROGRAM), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=child_env())
        self.items: list[Any] = []
        self.stderr_lines: list[str] = []
        self.cursor = 0                 # index after the last matched item
        self.last_match_index = -1
        self.eof = False
        self._cond = threading.Condition()
        self._out_thread = threading.Thread(target=self._read_stdout, daemon=True,
                                            name=f"stdout:{self.label}")
        self._err_thread = threading.Thread(target=self._read_stderr, daemon=True,
                                            name=f"stderr:{self.label}")
        self._out_thread.start()
        self._err_thread.start()

    # --- background readers ---

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            item: Any = line
            if self.json_mode:
                try:
                    item = json.loads(line)
                    if not isinstance(item, dict) or "type" not in item:
                        raise ValueError("not an object with a type")
                except ValueError:
                    item = {"type": "<not json>", "raw": line}
            with self._cond:
                self.items.append(item)
                self._cond.notify_all()
        with self._cond:
            self.eof = True
            self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.stderr_lines.append(raw.decode("utf-8", errors="replace").rstrip("\r\n"))

    # --- waiting ---

    def _matcher(self, what: str | Predicate) -> Predicate:
        if callable(what):
            return what
        if self.json_mode:
            return lambda item: item.get("type") == what
        return lambda item: what in item

    def wait_for(self, what: str | Predicate, timeout: float = DEFAULT_TIMEOUT,
                 since: int | None = None) -> Any:
        """The first item after the cursor that matches; moves the cursor past it.

        `what` is an event type (JSON mode), a substring (text mode) or a
        predicate. `since` scans from that index instead of the cursor (0:
        everything seen; the cursor then never moves backwards). Fails with
        everything seen if nothing matches before `timeout` or the end of
        output.
        """
        match = self._matcher(what)
        deadline = time.monotonic() + timeout
        with self._cond:
            index = self.cursor if since is None else since
            while True:
                while index < len(self.items):
                    item = self.items[index]
                    index += 1
                    try:
                        ok = match(item)
                    except (KeyError, TypeError, AttributeError):
                        ok = False
                    if ok:
                        self.last_match_index = index - 1
                        self.cursor = max(self.cursor, index)   # never backwards
                        return item
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
        why = "its output ended" if self.eof else f"{timeout:g} s passed"
        pytest.fail(f"[{self.label}] waited for {what!r} but {why}; "
                    f"exit status {self.proc.poll()}; seen after cursor {self.cursor}:\n"
                    f"{_describe(self.items[self.cursor:])}\n"
                    f"stderr:\n{_describe(self.stderr_lines, 25)}", pytrace=False)

    def next(self, timeout: float = DEFAULT_TIMEOUT) -> Any:
        """The next item after the cursor, whatever it is."""
        return self.wait_for(lambda item: True, timeout)

    def mark(self) -> int:
        """The cursor now; pass it to `between` later."""
        return self.cursor

    def between(self, mark: int) -> list[Any]:
        """Items from `mark` up to (not including) the last matched item."""
        with self._cond:
            return list(self.items[mark:max(mark, self.last_match_index)])

    def seen(self) -> list[Any]:
        with self._cond:
            return list(self.items)

    def wait_eof(self, timeout: float = DEFAULT_TIMEOUT) -> list[Any]:
        """Wait until stdout ends; returns everything seen."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self.eof:
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"[{self.label}] stdout did not end within {timeout:g} s; "
                                f"seen:\n{_describe(self.items)}", pytrace=False)
                self._cond.wait(min(left, 0.5))
            return list(self.items)

    # --- process control ---

    def send(self, line: str) -> None:
        """Write one line (utf-8) to stdin and flush."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode("utf-8") + b"\n")
        self.proc.stdin.flush()

    def send_bytes(self, data: bytes) -> None:
        """Write raw bytes to stdin and flush."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass

    def wait(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """The exit status; fails if the process does not end in time."""
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"[{self.label}] still running after {timeout:g} s; seen:\n"
                        f"{_describe(self.seen())}\nstderr:\n"
                        f"{_describe(self.stderr_lines, 25)}", pytrace=False)
        self._out_thread.join(DEFAULT_TIMEOUT)
        return status

    def cleanup(self) -> None:
        """End the process if it still runs (SIGCONT first, in case it was
        stopped), then reap it and close the pipes."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.close_stdin()
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.close_stdin()
        self._out_thread.join(5)
        self._err_thread.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


class HostProcess(ChatProcess):
    """`chatroom.py --host --json --port 0 --interface 127.0.0.1 --no-advertise`."""

    def __init__(self, *flags: str, program: list[str] | None = None) -> None:
        super().__init__(["--host", "--json", "--port", "0", "--interface", LOOPBACK,
                          "--no-advertise", *flags], label="host", program=program)
        self.listening = self.wait_for(lambda e: True)
        assert self.listening.get("type") == "listening", \
            f"the host's first stdout line is not `listening`: {self.listening!r}"
        self.port: int = self.listening["port"]
        if "--insecure" in flags:
            INSECURE_PORTS.add(self.port)

    def stop(self, timeout: float = DEFAULT_TIMEOUT, signum: int = signal.SIGINT) -> int:
        """SIGINT (or `signum`), then the exit status; all output is then in `items`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        status = self.wait(timeout)
        self.wait_eof(timeout)
        return status


class Client(ChatProcess):
    """`chatroom.py --cli [--json] --server 127.0.0.1:PORT --room R --user U`."""

    ready: dict | None = None           # the `ready` event, once `join` saw it

    def __init__(self, port: int, room: str, user: str, *flags: str,
                 json_mode: bool = True, program: list[str] | None = None) -> None:
        args = ["--cli", "--server", f"{LOOPBACK}:{port}", "--room", room, "--user", user]
        if json_mode:
            args.insert(1, "--json")
        super().__init__([*args, *flags], json_mode=json_mode, label=f"client {user}",
                         program=program)
        self.room = room
        self.user = user


@pytest.fixture
def start_host():
    """Factory: start_host(*extra_flags) -> HostProcess, ended after the test."""
    started: list[HostProcess] = []

    def start(*flags: str) -> HostProcess:
        host = HostProcess(*flags)
        started.append(host)
        return host

    yield start
    for host in started:
        host.cleanup()


@pytest.fixture
def host(start_host) -> HostProcess:
    return start_host()


@pytest.fixture
def join():
    """Factory: join(port, room, user, *flags, json_mode=True, ready=True,
    program=None) -> Client (`program`: what runs instead of chatroom.py).

    With ready=True (JSON mode) it waits for the `ready` event first.
    """
    started: list[Client] = []

    def start(port: int, room: str, user: str, *flags: str, json_mode: bool = True,
              ready: bool = True, program: list[str] | None = None) -> Client:
        client = Client(port, room, user, *flags, json_mode=json_mode, program=program)
        started.append(client)
        if ready and json_mode:
            client.ready = client.wait_for("ready")
        return client

    yield start
    for client in started:
        client.cleanup()


# --- raw TCP peers -------------------------------------------------------------

def frame(body: bytes) -> bytes:
    """A wire frame: 4-byte big-endian length, then the body."""
    return struct.pack(">I", len(body)) + body


def frame_json(obj: dict) -> bytes:
    return frame(json.dumps(obj, ensure_ascii=False).encode("utf-8"))


@pytest.fixture
def raw_connect():
    """Factory: raw_connect(port) -> a connected socket, closed after the test."""
    socks: list[socket.socket] = []

    def connect(port: int, timeout: float = DEFAULT_TIMEOUT) -> socket.socket:
        sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
        if port not in INSECURE_PORTS:      # the key is the client program's to check
            sock = tls_client_context().wrap_socket(sock)
        socks.append(sock)
        return sock

    yield connect
    for sock in socks:
        sock.close()


def tls_client_context() -> ssl.SSLContext:
    """TLS 1.3, any certificate: for raw peers, which test the protocol."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _recv_exactly(sock: socket.socket, size: int, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < size:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(size - len(data))
        except TimeoutError:
            raise AssertionError(f"no complete frame in time; got {bytes(data)!r}") from None
        if not chunk:
            raise AssertionError(f"connection closed inside a frame; got {bytes(data)!r}")
        data += chunk
    return bytes(data)


def read_frame(sock: socket.socket, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """One JSON frame from a raw socket."""
    deadline = time.monotonic() + timeout
    (size,) = struct.unpack(">I", _recv_exactly(sock, 4, deadline))
    assert size <= 256 * 1024, f"frame of {size} bytes announced"
    return json.loads(_recv_exactly(sock, size, deadline).decode("utf-8"))


def wait_closed(sock: socket.socket, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """Read until the peer closes; returns the bytes read before the end.

    Fails if the connection is still open after `timeout`. A reset counts
    as closed.
    """
    deadline = time.monotonic() + timeout
    extra = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"connection still open after {timeout:g} s "
                                 f"(read {bytes(extra)[:200]!r})")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except (ConnectionResetError, ssl.SSLEOFError):     # TLS: closed without notify
            return bytes(extra)
        if not chunk:
            return bytes(extra)
        extra += chunk


def raw_login(sock: socket.socket, room: str, user: str,
              timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Log a raw socket in (protocol version 1); returns the `welcome` frame."""
    sock.sendall(frame_json({"type": "hello", "version": 1, "room": room, "user": user}))
    welcome = read_frame(sock, timeout)
    assert welcome.get("type") == "welcome", f"login refused: {welcome!r}"
    return welcome


def read_frame_until(sock: socket.socket, predicate: Predicate,
                     timeout: float = DEFAULT_TIMEOUT) -> tuple[dict, list[dict]]:
    """Frames until one matches: (the match, the frames before it)."""
    deadline = time.monotonic() + timeout
    before: list[dict] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no matching frame within {timeout:g} s; got {before!r}")
        got = read_frame(sock, left)
        if predicate(got):
            return got, before
        before.append(got)


# --- in-process hosts ------------------------------------------------------------

@pytest.fixture
async def make_host():
    """Start in-process hosts on 127.0.0.1 (no mDNS), plain TCP unless given
    a HostKey as `tls`; all are closed afterwards."""
    hosts: list[chatroom.Host] = []

    async def make(name: str = "test-host", tls: chatroom.HostKey | None = None,
                   **limits) -> chatroom.Host:
        host = chatroom.Host(bind=LOOPBACK, port=0, name=name, advertise=False,
                             limits=chatroom.Limits(**limits), tls=tls)
        await host.start()
        hosts.append(host)
        return host

    yield make
    for host in hosts:
        async with asyncio.timeout(DEFAULT_TIMEOUT):
            await host.close()


def free_udp_port() -> int:
    """A UDP port on loopback that nobody holds right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


@pytest.fixture
def faulty():
    """Factory: faulty(host_port, rate=0) -> a FaultProxy in front of a
    host (tests/faults.py), closed after the test."""
    from faults import FaultProxy
    made: list[FaultProxy] = []

    def make(port: int, rate: int = 0) -> FaultProxy:
        made.append(FaultProxy(port))
        made[-1].rate = rate
        return made[-1]
    yield make
    for proxy in made:
        proxy.close()
