"""File transfer (/send): end to end through a real host, and the helpers.

Every promise of the files issue has a test here: room and one-to-one files,
hostile names, never overwriting, empty files, chat flowing past a 200 MB
file, a corrupted chunk, a full disk, the host's refusals, a sender or a
recipient leaving mid-transfer, a stopped recipient, stale .part files,
progress events, and the parsing/naming helpers.

Everything runs on 127.0.0.1 (hosts with --port 0 --no-advertise); every
file and downloads folder lives under pytest's tmp_path; every client gets
its own --downloads folder (never the real ~/Downloads). Deadlines are
failure deadlines only: no test asserts how fast anything is, and the
absence of an event is shown by order (a later sentinel arrives first).

Some tests need control *below* the client: `FrameProxy` is a small TCP
proxy between the host and one client that understands the frame stream
(4-byte length, body; body[0] == 0 is file data). It can flip one byte in
the first data frame, or hold everything after the first N data frames
until the test releases it, so "mid-transfer" is a certainty, not a race.
It must read the frames, so a test that uses it runs its host and every
client with --insecure (plain TCP: `plain_tcp`); the others speak TLS.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chatroom
from chatroom import (
    claim_name,
    default_downloads_dir,
    numbered_names,
    parse_send,
    remove_stale_parts,
    safe_filename,
)
from conftest import LOOPBACK, ChatProcess, frame, frame_json, raw_login, read_frame_until

KiB = 1024
MiB = 1024 * 1024
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
BIG_TIMEOUT = 120.0          # a failure deadline for the large files, never a promise
ROOM = "files"


# --- helpers -----------------------------------------------------------------

def write_file(path: Path, data: bytes) -> str:
    """Write `data` to `path` (parents made); returns its SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def write_big(path: Path, size: int) -> str:
    """A `size`-byte file of random blocks, each stamped with its number (so a
    reordered or repeated block changes the hash); returns its SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(MiB)
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for number in itertools.count():
            left = size - number * MiB
            if left <= 0:
                break
            piece = (struct.pack(">Q", number) + block[8:])[:left]
            out.write(piece)
            digest.update(piece)
    return digest.hexdigest()


def sha256_of(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def ev(kind: str, **fields):
    """Predicate: an event of type `kind` whose fields equal `fields`."""
    def match(event: dict) -> bool:
        return event.get("type") == kind and all(event.get(k) == v for k, v in fields.items())
    match.__name__ = f"{kind}{fields or ''}"
    match.__qualname__ = match.__name__
    return match


def listing(folder: Path) -> list[str]:
    """Every entry of `folder` (hidden ones too), sorted; [] if it is missing."""
    return sorted(os.listdir(folder)) if folder.exists() else []


def part_files(folder: Path) -> list[str]:
    return [name for name in listing(folder) if name.endswith(".part")]


def wait_until(condition, what: str, timeout: float = 60.0) -> None:
    """Poll `condition` until true; fail after `timeout` (a deadline only)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"still not true after {timeout:g} s: {what}", pytrace=False)
        time.sleep(0.02)


def all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def check_received(event: dict, downloads: Path, size: int, sha256: str,
                   source: Path | None = None) -> Path:
    """A file_received event describes a verified file inside `downloads`."""
    path = Path(event["path"])
    assert path.is_absolute(), event
    assert path.resolve().parent == downloads.resolve(), event
    assert event["size"] == size and event["sha256"] == sha256, event
    assert path.name == event["name"], event
    assert path.stat().st_size == size
    assert sha256_of(path) == sha256
    if source is not None:
        assert path.read_bytes() == source.read_bytes()
    return path


def exchange(sender, receivers, text: str) -> None:
    """`sender` says `text`; it and every receiver get it (chat still works)."""
    sender.send(text)
    for client in [sender, *receivers]:
        client.wait_for(ev("message", text=text, **{"from": sender.user}))


def is_stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as stat_file:
        return stat_file.read().rpartition(")")[2].split()[0] in ("T", "t")


# --- fixtures ----------------------------------------------------------------

@pytest.fixture
def spool(tmp_path) -> Path:
    folder = tmp_path / "spool"
    folder.mkdir()
    return folder


@pytest.fixture
def plain_tcp(request) -> tuple[str, ...]:
    """("--insecure",) for a test whose FrameProxy reads the frames, else ()."""
    return ("--insecure",) if "proxy" in request.fixturenames else ()


@pytest.fixture
def room_host(start_host, spool, plain_tcp):
    """A host whose spool folder is under tmp_path (checked by some tests)."""
    return start_host("--spool-dir", str(spool), "--grace", "0.5",  # drops show soon
                      *plain_tcp)


@pytest.fixture
def member(join, tmp_path, plain_tcp):
    """Factory: member(port, user, *flags, downloads=None, **join_kw) -> Client
    in room ROOM with its own --downloads folder (`client.downloads`)."""
    def start(port: int, user: str, *flags: str, downloads: Path | None = None,
              room: str = ROOM, **kw) -> ChatProcess:
        folder = downloads or tmp_path / f"dl-{user.replace(' ', '_')}"
        client = join(port, room, user, "--downloads", str(folder), *plain_tcp, *flags,
                      **kw)
        client.downloads = folder
        return client
    return start


def spool_files(spool: Path) -> list[str]:
    """Files inside the host's spool folder(s) under `spool`."""
    return sorted(str(p.relative_to(spool)) for p in spool.rglob("*") if p.is_file())


# --- a raw protocol sender -----------------------------------------------------

class RawSender:
    """A logged-in raw socket that sends files by hand (FileOffer, Chunk
    frames, FileEnd), so a test controls every byte and every name."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.transfer = 0

    def offer(self, name: str, size: int, to: str = "") -> tuple[int, dict]:
        """FileOffer; returns (transfer, the host's file_accept or file_refuse)."""
        self.transfer += 1
        number = self.transfer
        self.sock.sendall(frame_json({"type": "file_offer", "transfer": number,
                                      "name": name, "size": size, "to": to}))
        reply, _ = read_frame_until(
            self.sock, lambda f: f.get("type") in ("file_accept", "file_refuse")
            and f.get("transfer") == number)
        return number, reply

    def data(self, number: int, payload: bytes) -> None:
        head = b"\x00" + number.to_bytes(4, "big")
        size = chatroom.MAX_CHUNK_BYTES
        self.sock.sendall(b"".join(frame(head + payload[i:i + size])
                                   for i in range(0, len(payload), size)))

    def end(self, number: int, sha256: str) -> None:
        self.sock.sendall(frame_json({"type": "file_end", "transfer": number,
                                      "sha256": sha256}))

    def wait(self, kind: str, number: int, timeout: float = 10.0) -> dict:
        got, _ = read_frame_until(self.sock, lambda f: f.get("type") == kind
                                  and f.get("transfer") == number, timeout)
        return got

    def send_file(self, name: str, payload: bytes, to: str = "") -> int:
        number, reply = self.offer(name, len(payload), to)
        assert reply["type"] == "file_accept", reply
        self.data(number, payload)
        self.end(number, hashlib.sha256(payload).hexdigest())
        self.wait("file_stored", number)
        return number


@pytest.fixture
def raw_sender(raw_connect):
    def connect(port: int, user: str) -> RawSender:
        sock = raw_connect(port)
        raw_login(sock, ROOM, user)
        return RawSender(sock)
    return connect


# --- a frame-aware TCP proxy -----------------------------------------------------

class FrameProxy:
    """One client <-> host connection through 127.0.0.1, frame by frame.

    - corrupt_down: flip one byte in the middle of the data of the first data
      frame going to the client (`corrupted` is set once done).
    - hold="down"|"up", hold_after=N: in that direction, forward N data
      frames, then hold every later frame (`holding` is set) until
      `release(keep)`; `keep(body)` filters the held and later frames.
      If the sending side closes while frames are held, the end waits behind
      them until `release`, or with drop_held_on_eof the held frames are
      dropped and the other side is shut down at once (a peer that vanished
      mid-file: what it "sent" never arrives).
    """

    def __init__(self, upstream_port: int, *, corrupt_down: bool = False,
                 hold: str | None = None, hold_after: int = 0,
                 drop_held_on_eof: bool = False) -> None:
        self.upstream_port = upstream_port
        self.corrupt_down = corrupt_down
        self.hold = hold
        self.hold_after = hold_after
        self.drop_held_on_eof = drop_held_on_eof
        self._eof_behind_held = False
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self.corrupted = threading.Event()
        self.holding = threading.Event()
        self.data_frames = {"up": 0, "down": 0}
        self._held: list[bytes] | None = None
        self._released = False
        self._keep = None
        self._locks = {"up": threading.Lock(), "down": threading.Lock()}
        self._dst: dict[str, socket.socket] = {}
        self._socks: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._serve, daemon=True, name="proxy")]
        self._threads[0].start()

    def _serve(self) -> None:
        try:
            client, _ = self.listener.accept()
            upstream = socket.create_connection((LOOPBACK, self.upstream_port))
        except OSError:
            return
        self._socks += [client, upstream]
        self._dst = {"up": upstream, "down": client}
        for direction, source in (("up", client), ("down", upstream)):
            thread = threading.Thread(target=self._pump, args=(direction, source),
                                      daemon=True, name=f"proxy-{direction}")
            self._threads.append(thread)
            thread.start()

    def _pump(self, direction: str, source: socket.socket) -> None:
        target = self._dst[direction]
        buffer = bytearray()
        try:
            while data := source.recv(MiB):
                buffer += data
                frames, position = [], 0
                while len(buffer) - position >= 4:
                    (size,) = struct.unpack_from(">I", buffer, position)
                    if len(buffer) - position < 4 + size:
                        break
                    frames.append(bytes(buffer[position:position + 4 + size]))
                    position += 4 + size
                del buffer[:position]
                with self._locks[direction]:
                    out = [f for f in (self._process(direction, f) for f in frames) if f]
                    if out:
                        target.sendall(b"".join(out))
        except OSError:
            pass
        with self._locks[direction]:
            if self.hold == direction and self._held is not None:
                if not self.drop_held_on_eof:
                    self._eof_behind_held = True    # `release` ends it
                    return
                self._held = None           # never delivered: the peer died first
                try:
                    target.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
        try:
            if buffer:
                target.sendall(bytes(buffer))
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _process(self, direction: str, data: bytes) -> bytes | None:
        is_data = len(data) > 4 and data[4] == 0
        if is_data:
            self.data_frames[direction] += 1
        if self.hold == direction:
            if self._held is not None:
                self._held.append(data)
                return None
            if self._released:
                return data if self._keep is None or self._keep(data[4:]) else None
            if is_data and self.data_frames[direction] > self.hold_after:
                self._held = [data]
                self.holding.set()
                return None
        if (direction == "down" and self.corrupt_down and is_data and len(data) > 9
                and not self.corrupted.is_set()):
            spot = 9 + (len(data) - 9) // 2       # inside the file data
            data = data[:spot] + bytes([data[spot] ^ 0x5A]) + data[spot + 1:]
            self.corrupted.set()
        return data

    def release(self, keep=None) -> None:
        """Forward what is held (filtered by `keep(body)`) and stop holding."""
        assert self.hold is not None
        with self._locks[self.hold]:
            held, self._held = self._held or [], None
            self._released, self._keep = True, keep
            out = [f for f in held if keep is None or keep(f[4:])]
            if out:
                self._dst[self.hold].sendall(b"".join(out))
            if self._eof_behind_held:
                self._dst[self.hold].shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for sock in [self.listener, *self._socks]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def proxy():
    """Factory: proxy(host_port, **options) -> FrameProxy, closed after the test."""
    made: list[FrameProxy] = []

    def make(port: int, **options) -> FrameProxy:
        made.append(FrameProxy(port, **options))
        return made[-1]
    yield make
    for each in made:
        each.close()


def not_file_data(body: bytes) -> bool:
    """keep= filter: drop the rest of a file (its data and its end)."""
    if body[:1] != b"{":
        return False
    return json.loads(body).get("type") not in ("file", "file_end", "file_abort")


# --- small tmpfs mounts (disk full) -------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """Factory: tmpfs(name, size) -> a mounted tmpfs folder under tmp_path, or
    None when mounting is not permitted. Always unmounted afterwards (request
    this fixture before `member`, so the clients end first)."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path | None:
        point = tmp_path / name
        point.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None:
            return None
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755",
                               "tmpfs", str(point)], capture_output=True)
        if done.returncode != 0 or not os.path.ismount(point):
            return None
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        if subprocess.run(["umount", str(point)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)
        assert not os.path.ismount(point), f"{point} is still mounted"


def fill_up(folder: Path) -> Path:
    """Fill the file system of `folder` to the last byte; returns the filler."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as out:
        for block in (MiB, 64 * KiB, 4 * KiB, 512, 1):
            data = b"\xff" * block
            try:
                while True:
                    out.write(data)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    assert shutil.disk_usage(folder).free < 64 * KiB
    return filler


class CoreClient:
    """A ClientCore run in this process (to inject errors below it), with the
    waiting API of the conftest clients (wait_for, mark, seen...)."""

    wait_for = ChatProcess.wait_for
    _matcher = ChatProcess._matcher
    next = ChatProcess.next
    mark = ChatProcess.mark
    between = ChatProcess.between
    seen = ChatProcess.seen

    def __init__(self, port: int, user: str, downloads: Path, plain_tcp: bool) -> None:
        self.items: list[dict] = []
        self.stderr_lines: list[str] = []
        self.cursor, self.last_match_index, self.eof = 0, -1, False
        self.json_mode, self.label, self.user = True, f"in-process {user}", user
        self.proc = types.SimpleNamespace(poll=lambda: None)
        self._cond = threading.Condition()
        self.downloads = downloads
        self.core = chatroom.ClientCore(   # TLS unless the host is plain_tcp's
            self._on_event, downloads=downloads, known_hosts=None if plain_tcp else
            chatroom.KnownHosts(downloads.parent / f"known-{user}.json"))
        self.core.start()
        assert self.core.join(LOOPBACK, port, ROOM, user).result(10)
        self.ready = self.wait_for("ready")

    def _on_event(self, event: dict) -> None:
        with self._cond:
            self.items.append(json.loads(json.dumps(event)))
            self._cond.notify_all()

    def send(self, line: str) -> None:
        chatroom.handle_line(self.core, line, self._on_event)

    def stop(self) -> None:
        self.core.stop()


@pytest.fixture
def core_client(plain_tcp):
    made: list[CoreClient] = []

    def make(port: int, user: str, downloads: Path) -> CoreClient:
        made.append(CoreClient(port, user, downloads, bool(plain_tcp)))
        return made[-1]
    yield make
    for client in made:
        client.stop()


# =============================================================================
# 1. Room files and one-to-one files
# =============================================================================

def test_room_file_reaches_everyone_else_not_the_sender(room_host, member, tmp_path, spool):
    """/send PATH: bob and carol get the file (absolute path, size, SHA-256,
    same bytes); alice gets file_sent and file_delivered per recipient, and
    never her own file; the host's spool holds nothing afterwards."""
    alice = member(room_host.port, "alice")
    bob = member(room_host.port, "bob")
    carol = member(room_host.port, "carol")
    source = tmp_path / "src" / "report.pdf"
    digest = write_file(source, os.urandom(300 * KiB + 17))

    alice.send(f"/send {source}")
    for client in (bob, carol):
        offer = client.wait_for("file_offer")
        assert offer["from"] == "alice" and offer["name"] == "report.pdf"
        assert offer["size"] == source.stat().st_size and offer["to"] is None
        got = client.wait_for("file_received")
        assert got["from"] == "alice" and got["name"] == "report.pdf"
        check_received(got, client.downloads, source.stat().st_size, digest, source)
    sent = alice.wait_for("file_sent")
    assert sent["name"] == "report.pdf" and sent["size"] == source.stat().st_size
    assert sent["sha256"] == digest and sent["to"] is None
    delivered = {alice.wait_for("file_delivered")["user"] for _ in range(2)}
    assert delivered == {"bob", "carol"}

    exchange(alice, [bob, carol], "after the room file")
    assert not [e for e in alice.seen() if e["type"] in ("file_offer", "file_received")]
    assert listing(alice.downloads) == []
    assert listing(bob.downloads) == ["report.pdf"]
    assert listing(carol.downloads) == ["report.pdf"]
    wait_until(lambda: not spool_files(spool), f"spool empty: {spool_files(spool)}")


def test_one_to_one_file_reaches_only_that_user(room_host, member, tmp_path):
    """/send PATH @bob: bob gets it; carol gets no file_offer (shown by
    order: a later room file is the first file_offer she sees) and nothing
    lands in her folder."""
    alice = member(room_host.port, "alice")
    bob = member(room_host.port, "bob")
    carol = member(room_host.port, "carol")
    secret = tmp_path / "src" / "secret.txt"
    digest = write_file(secret, b"for bob only\n" * 1000)
    later = tmp_path / "src" / "later.txt"
    later_digest = write_file(later, b"for everyone\n")

    carol_mark = carol.mark()
    alice.send(f"/send {secret} @bob")
    offer = bob.wait_for("file_offer")
    assert offer["name"] == "secret.txt" and offer["to"] == "bob"
    got = bob.wait_for("file_received")
    check_received(got, bob.downloads, secret.stat().st_size, digest, secret)
    assert alice.wait_for("file_sent")["to"] == "bob"
    assert alice.wait_for("file_delivered")["user"] == "bob"

    alice.send("sentinel message")
    alice.send(f"/send {later}")
    first_offer = carol.wait_for("file_offer")      # the first since the mark
    assert first_offer["name"] == "later.txt", first_offer
    before = carol.between(carol_mark)
    assert not [e for e in before if e["type"].startswith("file_")], before
    assert [e for e in before if ev("message", text="sentinel message")(e)], before
    assert not [e for e in carol.seen()[carol_mark:] if e["type"].startswith("file_")
                and e.get("name") == "secret.txt"]
    carol_got = carol.wait_for("file_received")
    check_received(carol_got, carol.downloads, later.stat().st_size, later_digest)
    assert listing(carol.downloads) == ["later.txt"]
    bob.wait_for(ev("file_received", name="later.txt"))
    assert sorted(listing(bob.downloads)) == ["later.txt", "secret.txt"]


def test_send_path_with_spaces_and_user_with_space(room_host, member, tmp_path, monkeypatch):
    """`/send my file.txt @bob` (a relative path with a space, no quotes) and
    `/send x.bin @bob smith` (a User ID with a space) both reach their one
    recipient."""
    work = tmp_path / "work"
    digest = write_file(work / "my file.txt", b"spaces are fine\n")
    digest_x = write_file(work / "x.bin", os.urandom(5000))
    monkeypatch.chdir(work)                 # the clients inherit this folder
    alice = member(room_host.port, "alice")
    bob = member(room_host.port, "bob")
    smith = member(room_host.port, "bob smith")

    alice.send("/send my file.txt @bob")
    got = bob.wait_for("file_received")
    assert got["name"] == "my file.txt"
    check_received(got, bob.downloads, len(b"spaces are fine\n"), digest)
    assert alice.wait_for("file_delivered")["user"] == "bob"

    alice.send("/send x.bin @bob smith")
    got = smith.wait_for("file_received")
    assert got["name"] == "x.bin" and got["from"] == "alice"
    check_received(got, smith.downloads, 5000, digest_x, work / "x.bin")
    assert alice.wait_for("file_sent")["to"] == "bob smith"
    assert alice.wait_for("file_delivered")["user"] == "bob smith"

    exchange(alice, [bob, smith], "sentinel")
    assert listing(bob.downloads) == ["my file.txt"]
    assert listing(smith.downloads) == ["x.bin"]


# =============================================================================
# 2. Hostile names
# =============================================================================

RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"} | {
    f"{dev}{n}" for dev in ("COM", "LPT") for n in "0123456789¹²³"}


def assert_safe_name(result: str) -> None:
    """What every saved name must be, on any system."""
    assert result, "empty name"
    assert "/" not in result and "\\" not in result, result
    assert not any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp")
                   for ch in result), ascii(result)
    assert not result.startswith("."), f"hidden name: {result!r}"
    assert not result.endswith((".", " ")), f"trailing dot or space: {result!r}"
    assert len(result.encode("utf-8")) <= chatroom.MAX_FILE_NAME_BYTES, len(result.encode())
    assert result not in (".", "..")
    stem = result.split(".", 1)[0].rstrip(" ")
    assert stem.upper() not in RESERVED, f"Windows device name: {result!r}"


HOSTILE_NAMES = [
    "../../etc/passwd", "..\\..\\x", "/abs/path.txt", "C:\\Windows\\evil.exe",
    ".bashrc", "CON", "NUL.txt", "com1.tar.gz", "name. . ", "a\x1b[31mb",
    "\u202etxt.exe", "A" * 300, "B" * 290 + ".txt", "日本" * 150 + ".txt", "..",
    "\x07\x1b", "///", "...",
]


def test_hostile_names_saved_inside_downloads_only(room_host, member, raw_sender, tmp_path):
    """A raw sender offers files with hostile names; the --json receiver saves
    each inside its downloads folder (resolved parent == the folder) under a
    visible, non-reserved name, never overwriting another, and writes nothing
    anywhere else."""
    downloads = tmp_path / "deep" / "er" / "downloads"
    bob = member(room_host.port, "bob", downloads=downloads)
    mallory = raw_sender(room_host.port, "mallory")
    before = all_files(tmp_path)
    saved: dict[Path, bytes] = {}

    for number, name in enumerate(HOSTILE_NAMES):
        payload = f"payload {number} for {name!r}\n".encode()
        transfer = mallory.send_file(name, payload)
        assert mallory.wait("file_delivered", transfer)["user"] == "bob"
        got = bob.wait_for("file_received")
        path = check_received(got, downloads, len(payload), hashlib.sha256(payload).hexdigest())
        assert path not in saved, f"{name!r} overwrote {path}"
        assert_safe_name(path.name)
        assert path.name in itertools.islice(numbered_names(safe_filename(name)), 5), \
            (name, path.name)
        saved[path] = payload

    for path, payload in saved.items():       # every file still holds its own bytes
        assert path.read_bytes() == payload
    assert set(listing(downloads)) == {p.name for p in saved}
    assert all_files(tmp_path) - before == set(saved), "a file was written elsewhere"
    for escaped in (tmp_path / "etc" / "passwd", tmp_path / "deep" / "etc" / "passwd",
                    tmp_path / "x", tmp_path / "deep" / "x", Path("/abs/path.txt")):
        assert not escaped.exists(), escaped


# Names that still come out unsafe (see the report: safe_filename bugs).
UNSAFE_AFTER_SANITISING = [
    ". .bashrc",                            # -> ".bashrc": a hidden file
    " . .profile",                          # -> ".profile"
    "a.\u3000 .",                           # -> "a.": a trailing dot
    "COM1" + " " * 300 + "x",               # cut to 180 bytes -> "COM1": a device
    "nul" + " " * 200 + "x.txt",            # cut -> "nul.txt": a device
]


def test_hostile_names_that_survive_sanitising_end_to_end(room_host, member, raw_sender,
                                                           tmp_path):
    """The same promise for names where the cleaning steps interact (strip
    order, truncation): the saved name must still be visible, have no
    trailing dot and not be a device name."""
    bob = member(room_host.port, "bob")
    mallory = raw_sender(room_host.port, "mallory")
    names = []
    for name in UNSAFE_AFTER_SANITISING:
        transfer = mallory.send_file(name, b"x")
        mallory.wait("file_delivered", transfer)
        got = bob.wait_for("file_received")
        assert Path(got["path"]).resolve().parent == bob.downloads.resolve()
        names.append(got["name"])
    bad = []
    for name, saved in zip(UNSAFE_AFTER_SANITISING, names):
        try:
            assert_safe_name(saved)
        except AssertionError as exc:
            bad.append(f"{name[:12]!r}... saved as {saved!r}: {str(exc).splitlines()[0]}")
    assert not bad, "\n".join(bad)


SAFE_FILENAME_TABLE = [
    ("../../etc/passwd", "passwd"),
    ("..\\..\\x", "x"),
    ("/abs/path.txt", "path.txt"),
    ("C:\\Windows\\evil.exe", "evil.exe"),
    (".bashrc", "bashrc"),
    ("...hidden", "hidden"),
    ("CON", "_CON"),
    ("con", "_con"),
    ("NUL.txt", "_NUL.txt"),
    ("com1.tar.gz", "_com1.tar.gz"),
    ("LPT9", "_LPT9"),
    ("COM¹.txt", "_COM¹.txt"),
    ("aux .c", "_aux .c"),
    ("CONSOLE.txt", "CONSOLE.txt"),
    ("name. . ", "name"),
    ("  spaced  ", "spaced"),
    ("a\x1b[31mb", "a[31mb"),
    ("\u202etxt.exe", "txt.exe"),
    ("zero\u200bwidth", "zerowidth"),
    ("a<b>c:d\"e|f?g*h", "a_b_c_d_e_f_g_h"),
    ("..", "file"),
    (".", "file"),
    ("", "file"),
    ("\x07\x1b", "file"),
    ("///", "file"),
    ("日本語のファイル.txt", "日本語のファイル.txt"),
    ("re\u0301sume\u0301.pdf", "r\u00e9sum\u00e9.pdf"),
    ("A" * 300, "A" * 180),
    ("B" * 300 + ".txt", "B" * 176 + ".txt"),
    ("C" * 300 + "." + "e" * 20, "C" * 180),   # an "extension" that long is not kept
]


@pytest.mark.parametrize("name,expected", SAFE_FILENAME_TABLE,
                         ids=[ascii(n)[:30] for n, _ in SAFE_FILENAME_TABLE])
def test_safe_filename_table(name, expected):
    assert safe_filename(name) == expected
    assert_safe_name(safe_filename(name))


def test_safe_filename_cuts_multibyte_names_on_character_boundaries():
    result = safe_filename("日本" * 150 + ".txt")
    assert result.endswith(".txt") and set(result[:-4]) == {"日", "本"}
    assert 170 < len(result.encode("utf-8")) <= chatroom.MAX_FILE_NAME_BYTES
    assert_safe_name(result)


@pytest.mark.parametrize("name", UNSAFE_AFTER_SANITISING,
                         ids=[ascii(n)[:16] for n in UNSAFE_AFTER_SANITISING])
def test_safe_filename_interacting_rules(name):
    """Leading dots after a space, a trailing dot before a wide space, a
    device name reached by cutting a long name: still safe."""
    assert_safe_name(safe_filename(name))


_TRICKY_PIECES = st.sampled_from(
    [".", "..", " ", "/", "\\", "\u3000", "\x00", "\x1b", "\u202e", "\u200f", "\n",
     ":", "*", "?", "\"", "<", "|", "CON", "nul", "Com1", "LPT¹", "aux", "a", "é",
     "e\u0301", "日", "\U0001F600", "\ud800", "txt", "tar", "gz"])
_NAMES = st.one_of(
    st.text(max_size=400),
    st.lists(_TRICKY_PIECES, max_size=40).map("".join),
    st.builds(lambda head, pad, tail: head + pad + tail,
              st.sampled_from(sorted(RESERVED) + [".", " ", ""]),
              st.text(alphabet=" .\u3000x", max_size=260), st.text(max_size=8)),
)


@settings(max_examples=600, deadline=None)
@given(_NAMES)
def test_safe_filename_any_text_gives_a_safe_name(name):
    """Any text: non-empty, no / or \\, no control characters, no leading
    dot, no trailing dot or space, at most 180 UTF-8 bytes, no device name."""
    assert_safe_name(safe_filename(name))


# =============================================================================
# 3. Same names: never overwrite
# =============================================================================

def test_same_name_numbered_and_existing_files_never_overwritten(room_host, member, tmp_path):
    """notes.txt three times -> notes.txt, notes (1).txt, notes (2).txt, each
    with its own bytes; a photo.jpg already in the folder stays as it was
    and the incoming one becomes photo (1).jpg."""
    alice = member(room_host.port, "alice")
    bob = member(room_host.port, "bob")
    bob.downloads.mkdir(parents=True)
    precious = bob.downloads / "photo.jpg"
    precious.write_bytes(b"my own photo, not from the chat")
    contents = [f"version {n}\n".encode() * (n + 1) for n in range(3)]

    expected = ["notes.txt", "notes (1).txt", "notes (2).txt"]
    for number, data in enumerate(contents):
        digest = write_file(tmp_path / f"src{number}" / "notes.txt", data)
        alice.send(f"/send {tmp_path / f'src{number}' / 'notes.txt'} @bob")
        got = bob.wait_for("file_received")
        path = check_received(got, bob.downloads, len(data), digest)
        assert path.name == expected[number]
        alice.wait_for("file_delivered")
    for name, data in zip(expected, contents):
        assert (bob.downloads / name).read_bytes() == data

    digest = write_file(tmp_path / "src" / "photo.jpg", b"\xff\xd8 from alice")
    alice.send(f"/send {tmp_path / 'src' / 'photo.jpg'} @bob")
    got = bob.wait_for("file_received")
    assert Path(got["path"]).name == "photo (1).jpg"
    check_received(got, bob.downloads, len(b"\xff\xd8 from alice"), digest)
    assert precious.read_bytes() == b"my own photo, not from the chat"
    assert listing(bob.downloads) == sorted(expected + ["photo (1).jpg", "photo.jpg"])


# =============================================================================
# 4. Empty file
# =============================================================================

def test_empty_file(room_host, member, tmp_path):
    alice = member(room_host.port, "alice")
    bob = member(room_host.port, "bob")
    empty = tmp_path / "src" / "empty.txt"
    write_file(empty, b"")
    alice.send(f"/send {empty}")
    got = bob.wait_for("file_received")
    assert got["size"] == 0 and got["sha256"] == EMPTY_SHA256
    check_received(got, bob.downloads, 0, EMPTY_SHA256)
    sent = alice.wait_for("file_sent")
    assert sent["size"] == 0 and sent["sha256"] == EMPTY_SHA256
    assert alice.wait_for("file_delivered")["user"] == "bob"
    assert listing(bob.downloads) == ["empty.txt"]


# =============================================================================
# 5. Chat keeps flowing past a large file
# =============================================================================

def test_message_typed_after_send_overtakes_200mb_file(room_host, member, tmp_path, spool):
    """A text typed right after `/send big` reaches every recipient before
    the file does (order of events in each stream, never a timing)."""
    alice = member(room_host.port, "alice")
    bob = member(room_host.port, "bob")
    carol = member(room_host.port, "carol")
    big = tmp_path / "src" / "big.bin"
    size = 200 * MiB
    digest = write_big(big, size)
    marks = {c.label: c.mark() for c in (bob, carol)}

    alice.send(f"/send {big}")
    alice.send("typed right after /send")
    for client in (bob, carol):
        got = client.wait_for("file_received", timeout=BIG_TIMEOUT)
        check_received(got, client.downloads, size, digest)
        stream = client.seen()[marks[client.label]:]
        kinds = [(e["type"], e.get("text")) for e in stream]
        message_at = kinds.index(("message", "typed right after /send")) \
            if ("message", "typed right after /send") in kinds else None
        received_at = kinds.index(("file_received", None))
        assert message_at is not None and message_at < received_at, \
            f"{client.label}: the message did not come before file_received: {kinds}"
    alice.wait_for("file_sent", timeout=BIG_TIMEOUT)
    for client in (bob, carol):             # free 400 MB early
        for name in listing(client.downloads):
            os.unlink(client.downloads / name)
    wait_until(lambda: not spool_files(spool), f"spool empty: {spool_files(spool)}")


# =============================================================================
# 6. A corrupted chunk
# =============================================================================

def test_corrupted_chunk_fails_checksum_only_for_that_recipient(room_host, member, proxy,
                                                               tmp_path):
    """A proxy flips one byte of file data going to bob: bob reports
    checksum_mismatch and keeps no file and no .part; alice is told (user
    bob); carol, connected directly, gets the file; chat goes on."""
    bob_link = proxy(room_host.port, corrupt_down=True)
    alice = member(room_host.port, "alice")
    bob = member(bob_link.port, "bob")
    carol = member(room_host.port, "carol")
    source = tmp_path / "src" / "data.bin"
    digest = write_big(source, 3 * MiB)

    alice.send(f"/send {source}")
    failed = bob.wait_for("file_failed", timeout=30)
    assert bob_link.corrupted.is_set()
    assert failed["code"] == "checksum_mismatch", failed
    told = alice.wait_for(ev("file_failed", user="bob"), timeout=30)
    assert told["code"] == "checksum_mismatch", told
    got = carol.wait_for("file_received", timeout=30)
    check_received(got, carol.downloads, 3 * MiB, digest, source)
    assert alice.wait_for(ev("file_delivered", user="carol"), since=0)
    wait_until(lambda: listing(bob.downloads) == [],
               f"bob's folder empty: {listing(bob.downloads)}")
    assert not [e for e in bob.seen() if e["type"] == "file_received"]

    exchange(alice, [bob, carol], "still talking after the bad chunk")
    exchange(bob, [alice, carol], "bob too")


# =============================================================================
# 7. Disk full
# =============================================================================

def _disk_full_while_writing(room_host, member, proxy, tmpfs, core_client, tmp_path,
                             monkeypatch, *, inject: bool) -> str:
    """Bob's disk fills up while his download is being written. Returns
    which path ran: "tmpfs" (a real full file system) or "injected"."""
    path = "injected"
    mount = None if inject else tmpfs("mnt-full", "16m")
    alice = member(room_host.port, "alice")
    carol = member(room_host.port, "carol")
    if mount is not None:
        path = "tmpfs"
        downloads = mount / "downloads"
        gate = proxy(room_host.port, hold="down", hold_after=2)
        bob = member(gate.port, "bob", downloads=downloads)
    else:
        downloads = tmp_path / "dl-bob-injected"

        def no_space(dl, chunks):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(chatroom, "_write_and_hash", no_space)
        bob = core_client(room_host.port, "bob", downloads)
    source = tmp_path / "src" / "five.bin"
    digest = write_big(source, 5 * MiB)

    alice.send(f"/send {source}")
    bob.wait_for("file_offer")
    if mount is not None:                   # the .part is open: now fill the disk
        assert gate.holding.wait(30), "the proxy never saw the file data"
        wait_until(lambda: part_files(downloads), "bob's .part file exists")
        filler = fill_up(mount)
        gate.release()
    failed = bob.wait_for("file_failed", timeout=30)
    assert failed["code"] == "disk_full", failed
    told = alice.wait_for(ev("file_failed", user="bob"), timeout=30)
    assert told["code"] == "disk_full", told
    got = carol.wait_for("file_received", timeout=30)
    check_received(got, carol.downloads, 5 * MiB, digest, source)
    wait_until(lambda: listing(downloads) == [],
               f"no partial file left: {listing(downloads)}")
    exchange(alice, [bob, carol], "chat is unaffected by bob's full disk")
    exchange(bob, [alice, carol], "bob can still talk")

    if mount is not None:                   # space again: bob receives again
        filler.unlink()
        small = tmp_path / "src" / "small.txt"
        small_digest = write_file(small, b"room again\n")
        alice.send(f"/send {small} @bob")
        check_received(bob.wait_for("file_received"), downloads, 11, small_digest)
    return path


def test_disk_full_while_writing(tmpfs, room_host, member, proxy, core_client, tmp_path,
                                 monkeypatch, record_property):
    """Bob's downloads folder fills up mid-file: bob gets file_failed
    disk_full and keeps no .part and no file; alice gets a file_failed
    naming bob; carol gets the file; chat goes on.

    Path: as root, bob's --downloads is a 16 MiB tmpfs; a proxy holds the
    file's data after the .part is open, the test fills the tmpfs to the
    last byte, then lets the data through (a real ENOSPC from write()).
    Without permission to mount, the same assertions run against a
    ClientCore in this process whose `_write_and_hash` raises ENOSPC.
    The path that ran is recorded as the `disk_full_path` property.
    """
    path = _disk_full_while_writing(room_host, member, proxy, tmpfs, core_client,
                                    tmp_path, monkeypatch, inject=False)
    record_property("disk_full_path", path)
    print(f"disk-full path: {path}")


def test_disk_full_injected_at_write_layer(tmpfs, room_host, member, proxy, core_client,
                                           tmp_path, monkeypatch):
    """The fallback path of test_disk_full_while_writing, always run: ENOSPC
    injected at the write layer of an in-process ClientCore."""
    assert _disk_full_while_writing(room_host, member, proxy, tmpfs, core_client, tmp_path,
                                    monkeypatch, inject=True) == "injected"


def test_file_bigger_than_free_space_refused_up_front(tmpfs, room_host, member,
                                                      core_client, tmp_path, monkeypatch,
                                                      record_property):
    """A 5 MB file for a 2 MiB downloads disk is refused before anything is
    written (disk_full, no .part, no file); alice is told; carol gets it.

    Path: as root a real 2 MiB tmpfs; otherwise an in-process ClientCore
    whose free-space check sees 2 MiB free."""
    mount = tmpfs("mnt-small", "2m")
    alice = member(room_host.port, "alice")
    carol = member(room_host.port, "carol")
    if mount is not None:
        downloads = mount / "downloads"
        bob = member(room_host.port, "bob", downloads=downloads)
        record_property("disk_full_path", "tmpfs")
    else:
        downloads = tmp_path / "dl-bob-small"
        usage = types.SimpleNamespace(total=2 * MiB, used=0, free=2 * MiB)
        monkeypatch.setattr(chatroom, "shutil", types.SimpleNamespace(
            disk_usage=lambda folder: usage))
        bob = core_client(room_host.port, "bob", downloads)
        record_property("disk_full_path", "injected")
    source = tmp_path / "src" / "five.bin"
    digest = write_big(source, 5 * MiB)

    alice.send(f"/send {source}")
    failed = bob.wait_for("file_failed", timeout=30)
    assert failed["code"] == "disk_full", failed
    told = alice.wait_for(ev("file_failed", user="bob"), timeout=30)
    assert told["code"] == "disk_full"
    check_received(carol.wait_for("file_received", timeout=30), carol.downloads,
                   5 * MiB, digest)
    wait_until(lambda: listing(downloads) == [], f"nothing left: {listing(downloads)}")
    exchange(alice, [bob, carol], "after the refusal")


# =============================================================================
# 8. Refusals
# =============================================================================

def test_file_over_host_limit_refused(start_host, member, raw_sender, tmp_path):
    """Host --max-file-size 1K: a 2 KB file -> error and file_failed
    file_too_large for the sender, nothing for anyone else; a 1 KiB file
    still goes (and is the first file bob hears of). A raw client that
    offers 2 KB anyway is refused by the host itself."""
    small_host = start_host("--max-file-size", "1K")
    alice = member(small_host.port, "alice")
    bob = member(small_host.port, "bob")
    too_big = tmp_path / "src" / "big.txt"
    write_file(too_big, b"x" * 2048)
    fits = tmp_path / "src" / "fits.txt"
    fits_digest = write_file(fits, b"y" * 1024)

    bob_mark = bob.mark()
    alice.send(f"/send {too_big}")
    error = alice.wait_for("error")
    assert error["code"] == "file_too_large", error
    failed = alice.wait_for("file_failed")
    assert failed["code"] == "file_too_large" and failed["name"] == "big.txt", failed

    mallory = raw_sender(small_host.port, "mallory")
    _, reply = mallory.offer("big.txt", 2048)
    assert reply["type"] == "file_refuse" and reply["code"] == "file_too_large", reply

    alice.send(f"/send {fits}")
    first = bob.wait_for("file_offer")
    assert first["name"] == "fits.txt", first
    check_received(bob.wait_for("file_received"), bob.downloads, 1024, fits_digest)
    assert not [e for e in bob.seen()[bob_mark:] if e.get("name") == "big.txt"]
    assert listing(bob.downloads) == ["fits.txt"]
    assert not [e for e in alice.seen() if e["type"] == "file_sent"
                and e["name"] == "big.txt"]


@pytest.mark.parametrize("target", ["@nobody", "@alice", "@ALICE"])
def test_unknown_recipient_or_self_refused(room_host, member, tmp_path, target):
    """/send x @nobody and /send x @<yourself> -> no_such_user; nothing is
    offered to anyone."""
    alice = member(room_host.port, "alice")
    bob = member(room_host.port, "bob")
    source = tmp_path / "src" / "x.txt"
    write_file(source, b"x")
    bob_mark = bob.mark()
    alice.send(f"/send {source} {target}")
    error = alice.wait_for("error")
    assert error["code"] == "no_such_user", error
    failed = alice.wait_for("file_failed")
    assert failed["code"] == "no_such_user", failed
    exchange(alice, [bob], "sentinel")
    assert not [e for e in bob.seen()[bob_mark:] if e["type"].startswith("file_")]
    assert not [e for e in alice.seen() if e["type"] in ("file_sent", "file_delivered")]
    assert listing(bob.downloads) == [] and listing(alice.downloads) == []


def test_paths_that_are_not_files_refused(room_host, member, tmp_path):
    """A missing path, a directory, /dev/zero -> not_a_file, nothing sent;
    `/send` alone -> an error."""
    alice = member(room_host.port, "alice")
    bob = member(room_host.port, "bob")
    (tmp_path / "a folder").mkdir()
    bob_mark = bob.mark()
    for path in (tmp_path / "missing.txt", tmp_path / "a folder", Path("/dev/zero")):
        alice.send(f"/send {path}")
        error = alice.wait_for("error")
        assert error["code"] == "not_a_file", (path, error)
        failed = alice.wait_for("file_failed")
        assert failed["code"] == "not_a_file", (path, failed)
    for line in ("/send", "/send   "):
        alice.send(line)
        error = alice.wait_for("error")
        assert error["message"], error
    exchange(alice, [bob], "sentinel")
    assert not [e for e in bob.seen()[bob_mark:] if e["type"].startswith("file_")]
    assert not [e for e in alice.seen() if e["type"] in ("file_sent", "file_progress")]
    assert listing(bob.downloads) == []


# =============================================================================
# 9. The sender leaves mid-transfer
# =============================================================================

def test_sender_connection_closes_half_way(room_host, member, raw_sender):
    """A raw sender offers 8 MiB, sends half and closes its socket: every
    recipient gets file_failed sender_left and keeps no .part."""
    bob = member(room_host.port, "bob")
    carol = member(room_host.port, "carol")
    mallory = raw_sender(room_host.port, "mallory")
    payload = os.urandom(4 * MiB)
    number, reply = mallory.offer("half.bin", 8 * MiB)
    assert reply["type"] == "file_accept"
    mallory.data(number, payload)
    for client in (bob, carol):
        client.wait_for(ev("file_offer", name="half.bin"))
    mallory.sock.close()
    for client in (bob, carol):
        failed = client.wait_for("file_failed", timeout=30)
        assert failed["code"] == "sender_left" and failed["name"] == "half.bin", failed
        client.wait_for(ev("system", event="leave", user="mallory"), since=0)
    for client in (bob, carol):
        wait_until(lambda c=client: listing(c.downloads) == [],
                   f"{client.label}: no .part left: {listing(client.downloads)}")
    exchange(bob, [carol], "after the sender vanished")


def test_sender_killed_mid_transfer(room_host, member, proxy, tmp_path, spool):
    """kill -9 of a --cli sender whose file is certainly unfinished (a proxy
    holds its data after two chunks): recipients get sender_left and keep
    no .part; the host forgets the upload (spool empty)."""
    gate = proxy(room_host.port, hold="up", hold_after=2, drop_held_on_eof=True)
    alice = member(gate.port, "alice")
    bob = member(room_host.port, "bob")
    carol = member(room_host.port, "carol")
    source = tmp_path / "src" / "eight.bin"
    write_big(source, 8 * MiB)

    alice.send(f"/send {source}")
    assert gate.holding.wait(30), "alice's data never reached the proxy"
    for client in (bob, carol):
        client.wait_for(ev("file_offer", name="eight.bin"))
    alice.proc.send_signal(signal.SIGKILL)
    alice.proc.wait(10)
    for client in (bob, carol):
        failed = client.wait_for("file_failed", timeout=30)
        assert failed["code"] == "sender_left", failed
        client.wait_for(ev("system", event="leave", user="alice"), timeout=30, since=0)
        assert not [e for e in client.seen() if e["type"] == "file_received"]
    for client in (bob, carol):
        wait_until(lambda c=client: listing(c.downloads) == [],
                   f"{client.label}: no .part left: {listing(client.downloads)}")
    wait_until(lambda: not spool_files(spool), f"spool empty: {spool_files(spool)}")
    exchange(bob, [carol], "after the sender was killed")


# =============================================================================
# 10. A recipient leaves mid-transfer
# =============================================================================

def test_recipient_leaves_mid_transfer(room_host, member, proxy, tmp_path):
    """bob types /quit while a file is coming to him (a proxy holds the rest
    of its data): alice gets file_failed recipient_left naming bob, carol
    still gets the file, and bob's folder has no .part once he has exited.

    While ClientCore.stop() cancels the write thread's queued jobs, the last
    check fails now and then (the .part deletion is queued when stop() runs);
    test_leaving_while_the_disk_is_busy_leaves_no_part shows it every time."""
    gate = proxy(room_host.port, hold="down", hold_after=2)
    alice = member(room_host.port, "alice")
    bob = member(gate.port, "bob")
    carol = member(room_host.port, "carol")
    source = tmp_path / "src" / "eight.bin"
    digest = write_big(source, 8 * MiB)

    alice.send(f"/send {source}")
    bob.wait_for(ev("file_offer", name="eight.bin"))
    assert gate.holding.wait(30), "no file data reached bob's proxy"
    wait_until(lambda: part_files(bob.downloads), "bob's .part exists")
    bob.send("/quit")
    told = alice.wait_for(ev("file_failed", user="bob"), timeout=30)
    assert told["code"] == "recipient_left", told
    gate.release(keep=not_file_data)        # the rest of the file never reaches bob
    status = bob.wait(15)
    assert status == 0, (bob.seen()[-6:], bob.stderr_lines[-10:])
    assert bob.wait_eof()[-1] == {"type": "closed", "reason": "quit"}
    assert not [e for e in bob.seen() if e["type"] == "file_received"]
    assert part_files(bob.downloads) == [], \
        f"bob exited and left his .part behind: {listing(bob.downloads)}"
    assert listing(bob.downloads) == []

    check_received(carol.wait_for("file_received", timeout=30), carol.downloads,
                   8 * MiB, digest, source)
    assert alice.wait_for(ev("file_delivered", user="carol"), since=0)
    exchange(alice, [carol], "bob has gone")


def _leave_mid_download_on_slow_disk(room_host, member, core_client, tmp_path, monkeypatch,
                                     write_delay: float):
    """bob (an in-process ClientCore whose every batch write takes
    `write_delay` s: a slow disk) leaves while a 16 MiB file comes to him.
    Returns (bob, his downloads folder, his `closed` event)."""
    real_write = chatroom._write_and_hash

    def slow_write(dl, chunks):
        time.sleep(write_delay)
        real_write(dl, chunks)
    monkeypatch.setattr(chatroom, "_write_and_hash", slow_write)
    alice = member(room_host.port, "alice")
    downloads = tmp_path / "dl-bob-slow-disk"
    bob = core_client(room_host.port, "bob", downloads)
    source = tmp_path / "src" / "sixteen.bin"
    write_big(source, 16 * MiB)

    alice.send(f"/send {source} @bob")
    bob.wait_for("file_offer")
    bob.wait_for(lambda e: e["type"] == "file_progress" and e["bytes"] >= 2 * MiB, timeout=30)
    wait_until(lambda: part_files(downloads), "bob's .part exists")
    bob.core.leave().result(30)
    closed = bob.wait_for("closed")
    assert alice.wait_for(ev("file_failed", user="bob"), timeout=30)["code"] == "recipient_left"
    return bob, downloads, closed


def test_leaving_while_the_disk_is_busy_leaves_no_part(room_host, member, core_client,
                                                      tmp_path, monkeypatch):
    """The promise of the test above, made deterministic: bob's disk is slow,
    so when he leaves mid-file the deletion of his .part is queued behind
    writes. After leave() and stop() the .part must still be deleted."""
    bob, downloads, _ = _leave_mid_download_on_slow_disk(
        room_host, member, core_client, tmp_path, monkeypatch, write_delay=0.2)
    bob.core.stop()
    wait_until(lambda: not part_files(downloads),
               f"bob left and stopped, yet his .part stays: {listing(downloads)}")


def test_leaving_mid_download_on_a_slow_disk_closes_as_quit(room_host, member, core_client,
                                                           tmp_path, monkeypatch):
    """Leaving is leaving: `closed{reason: quit}` (exit status 0 for --cli),
    even when file data for a download is still queued behind a slow disk."""
    _, _, closed = _leave_mid_download_on_slow_disk(
        room_host, member, core_client, tmp_path, monkeypatch, write_delay=0.5)
    assert closed["reason"] == "quit", closed


# =============================================================================
# 11. A stopped recipient never slows the others
# =============================================================================

def test_stopped_recipient_does_not_slow_the_others(room_host, member, tmp_path, spool):
    """bob is SIGSTOPped; a 100 MiB file reaches carol while bob is still
    stopped (the host spills what bob still needs to its spool); after
    SIGCONT bob gets the whole file too, and the spool ends empty."""
    alice = member(room_host.port, "alice")
    bob = member(room_host.port, "bob")
    carol = member(room_host.port, "carol")
    source = tmp_path / "src" / "hundred.bin"
    size = 100 * MiB
    digest = write_big(source, size)

    bob.proc.send_signal(signal.SIGSTOP)
    try:
        alice.send(f"/send {source}")
        got = carol.wait_for("file_received", timeout=BIG_TIMEOUT)
        assert is_stopped(bob.proc.pid), "bob was not stopped during the transfer"
        assert not [e for e in bob.seen() if e["type"] == "file_received"]
        check_received(got, carol.downloads, size, digest)
        assert alice.wait_for("file_delivered", timeout=BIG_TIMEOUT)["user"] == "carol"
        spilled = spool_files(spool)
        assert spilled, "the host kept a 100 MiB backlog without spilling it to --spool-dir"
    finally:
        bob.proc.send_signal(signal.SIGCONT)
    got = bob.wait_for("file_received", timeout=BIG_TIMEOUT)
    check_received(got, bob.downloads, size, digest)
    assert alice.wait_for("file_delivered", timeout=BIG_TIMEOUT)["user"] == "bob"
    wait_until(lambda: not spool_files(spool), f"spool empty: {spool_files(spool)}")
    exchange(alice, [bob, carol], "everyone has it")
    for client in (bob, carol):
        for name in listing(client.downloads):
            os.unlink(client.downloads / name)
    assert room_host.stop() == 0
    assert listing(spool) == [], f"the host left {listing(spool)} in --spool-dir"


# =============================================================================
# 12. Stale .part files
# =============================================================================

def dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with pytest.raises(ProcessLookupError):
        os.kill(child.pid, 0)
    return child.pid


def test_stale_parts_removed_when_next_download_starts(room_host, member, tmp_path):
    """A `.x.chatroom-<dead pid>-abcd.part` is deleted when the next download
    starts; one of a live process, and unrelated files, are kept."""
    downloads = tmp_path / "dl-bob"
    downloads.mkdir()
    stale = downloads / f".x.chatroom-{dead_pid()}-abcd.part"
    live = downloads / f".y.chatroom-{os.getpid()}-abcd.part"
    unrelated = [downloads / "notes.part", downloads / ".z.chatroom-x-abcd.part"]
    for path in [stale, live, *unrelated]:
        path.write_bytes(b"half a file")
    alice = member(room_host.port, "alice")
    bob = member(room_host.port, "bob", downloads=downloads)
    exchange(alice, [bob], "nothing is downloading yet")
    assert stale.exists(), "stale .part removed before any download started"

    source = tmp_path / "src" / "new.txt"
    digest = write_file(source, b"new")
    alice.send(f"/send {source}")
    check_received(bob.wait_for("file_received"), downloads, 3, digest)
    assert not stale.exists(), "the dead process's .part is still there"
    assert live.read_bytes() == b"half a file"
    for path in unrelated:
        assert path.read_bytes() == b"half a file", path


def test_remove_stale_parts_unit(tmp_path):
    stale = tmp_path / f".a b.txt.chatroom-{dead_pid()}-0123abcd.part"
    mine = tmp_path / f".c.chatroom-{os.getpid()}-ff.part"
    init = tmp_path / ".d.chatroom-1-ff.part"          # PID 1 always runs
    other = tmp_path / "e.chatroom-999999-ff.part"    # not hidden: not ours
    for path in (stale, mine, init, other):
        path.write_bytes(b"")
    remove_stale_parts(tmp_path)
    assert not stale.exists()
    assert mine.exists() and init.exists() and other.exists()
    remove_stale_parts(tmp_path / "missing")          # no folder: no error


# =============================================================================
# 13. Progress
# =============================================================================

def test_progress_events_are_paced_and_increasing(room_host, member, tmp_path):
    """file_progress for a 40 MiB file: bytes increase, percent stays within
    0..100 and ends at 100, and there are few per second (counted loosely
    against the transfer's duration, for sender and recipient)."""
    alice = member(room_host.port, "alice")
    bob = member(room_host.port, "bob")
    source = tmp_path / "src" / "forty.bin"
    size = 40 * MiB
    write_big(source, size)
    started = time.monotonic()
    alice.send(f"/send {source}")
    bob.wait_for("file_received", timeout=BIG_TIMEOUT)
    alice.wait_for("file_delivered", timeout=BIG_TIMEOUT)
    duration = time.monotonic() - started

    for client, direction in ((bob, "receive"), (alice, "send")):
        progress = [e for e in client.seen() if e["type"] == "file_progress"]
        assert progress, f"{client.label}: no file_progress"
        assert {e["direction"] for e in progress} == {direction}
        done = [e["bytes"] for e in progress]
        assert done == sorted(done) and len(set(done)) == len(done), done
        assert all(0 <= e["percent"] <= 100 and e["size"] == size for e in progress)
        percents = [e["percent"] for e in progress]
        assert percents == sorted(percents)
        assert progress[-1]["bytes"] == size and progress[-1]["percent"] == 100
        assert len(progress) < 10 * (duration + 1), (len(progress), duration)


def test_progress_line_in_human_mode(room_host, member, tmp_path):
    """Without --json a person sees a progress line with a percentage."""
    alice = member(room_host.port, "alice")
    bob = member(room_host.port, "bob", json_mode=False)
    bob.wait_for("Joined room")
    alice.wait_for(ev("system", event="enter", user="bob"))
    source = tmp_path / "src" / "three.bin"
    write_big(source, 3 * MiB)
    alice.send(f"/send {source}")
    line = bob.wait_for(lambda line: "three.bin" in line and "%" in line, timeout=30)
    assert re.search(r"three\.bin: \d+% of ", line), line
    bob.wait_for("Saved three.bin", timeout=30)
    assert (bob.downloads / "three.bin").exists()


# =============================================================================
# 14. Helpers: parse_send, numbered_names, claim_name, default_downloads_dir
# =============================================================================

PARSE_SEND_TABLE = [
    ("/send my file.txt", ("my file.txt", None)),
    ("/send my file.txt @bob", ("my file.txt", "bob")),
    ("/send x.bin @bob smith", ("x.bin", "bob smith")),
    ("/send x.bin @bob smith  ", ("x.bin", "bob smith")),
    ('/send "my file.txt"', ("my file.txt", None)),
    ('/send "my file.txt" @bob', ("my file.txt", "bob")),
    ("/send '/tmp/a b.txt' @bob", ("/tmp/a b.txt", "bob")),
    ('/send "a b" @bob smith', ("a b", "bob smith")),
    ("/send /tmp/dir @x/y.txt", ("/tmp/dir @x/y.txt", None)),
    ("/send C:\\d @x\\y.txt", ("C:\\d @x\\y.txt", None)),
    ("/send /tmp/a @b/c.txt @carol", ("/tmp/a @b/c.txt", "carol")),
    ("/send a@bob", ("a@bob", None)),
    ("  /send   spaced.txt  ", ("spaced.txt", None)),
    ("/send", ("", None)),
    ("/send   ", ("", None)),
]


@pytest.mark.parametrize("line,expected", PARSE_SEND_TABLE,
                         ids=[line for line, _ in PARSE_SEND_TABLE])
def test_parse_send_table(line, expected):
    assert parse_send(line) == expected


def test_parse_send_expands_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert parse_send("/send ~/f.txt") == (str(tmp_path / "home" / "f.txt"), None)
    assert parse_send("/send ~/my f.txt @bob") == (str(tmp_path / "home" / "my f.txt"), "bob")
    assert parse_send('/send "~/q.txt"') == (str(tmp_path / "home" / "q.txt"), None)
    assert parse_send("/send a~b") == ("a~b", None)


def test_parse_send_quoted_path_with_at_sign_in_its_name():
    """A quoted path (as drag and drop gives it) is one path even when its
    last part contains " @": the quotes say where the path ends."""
    assert parse_send("/send '/home/u/a @b.txt'") == ("/home/u/a @b.txt", None)
    assert parse_send('/send "/home/u/mail @work.eml" @bob') == \
        ("/home/u/mail @work.eml", "bob")


def test_numbered_names():
    def first(name, count=4):
        return list(itertools.islice(numbered_names(name), count))
    assert first("notes.txt") == ["notes.txt", "notes (1).txt", "notes (2).txt",
                                  "notes (3).txt"]
    assert first("README", 3) == ["README", "README (1)", "README (2)"]
    assert first("my file.tar.gz", 2)[1].endswith(".gz")
    many = list(itertools.islice(numbered_names("a.b"), 1000))
    assert len(set(many)) == 1000 and many[999] == "a (999).b"
    for name in first("x.txt", 50):
        assert_safe_name(name)


def test_claim_name_never_overwrites_many_taken(tmp_path):
    folder = tmp_path / "dl"
    folder.mkdir()
    taken = list(itertools.islice(numbered_names("photo.jpg"), 60))
    for number, name in enumerate(taken):
        (folder / name).write_bytes(f"existing {number}".encode())
    (folder / "photo (61).jpg").mkdir()     # a folder is taken too
    part = folder / ".photo.jpg.chatroom-1-ab.part"
    part.write_bytes(b"new photo")
    result = claim_name(part, folder, "photo.jpg")
    assert result == folder / "photo (60).jpg"
    assert result.read_bytes() == b"new photo" and not part.exists()
    for number, name in enumerate(taken):
        assert (folder / name).read_bytes() == f"existing {number}".encode()

    part2 = folder / ".p2.part"
    part2.write_bytes(b"newer")
    assert claim_name(part2, folder, "photo.jpg") == folder / "photo (62).jpg"


def test_claim_name_does_not_write_through_a_symlink(tmp_path):
    folder = tmp_path / "dl"
    folder.mkdir()
    outside = tmp_path / "outside" / "x.txt"
    (folder / "x.txt").symlink_to(outside)             # dangling, pointing out
    part = folder / ".x.part"
    part.write_bytes(b"data")
    result = claim_name(part, folder, "x.txt")
    assert result == folder / "x (1).txt" and result.read_bytes() == b"data"
    assert not outside.exists() and not outside.parent.exists()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sets(st.integers(0, 25), max_size=20),
       st.sampled_from(["a.txt", "README", "x.tar.gz", "日本.md"]))
def test_claim_name_property(taken, name):
    """Whatever names are taken, the claimed one is new and nothing changes."""
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        names = list(itertools.islice(numbered_names(name), 30))
        for number in taken:
            (folder / names[number]).write_bytes(f"old {number}".encode())
        part = folder / ".incoming.part"
        part.write_bytes(b"incoming")
        result = claim_name(part, folder, name)
        assert result.parent == folder
        assert result.name == names[min(set(range(30)) - taken)]
        assert result.read_bytes() == b"incoming" and not part.exists()
        for number in taken:
            assert (folder / names[number]).read_bytes() == f"old {number}".encode()


def _user_dirs(folder: Path, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "user-dirs.dirs").write_text(text, encoding="utf-8")


def test_default_downloads_dir(monkeypatch, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    assert default_downloads_dir() == home / "Downloads" / "chatroom"

    # ~/.config/user-dirs.dirs, as xdg-user-dirs writes it (a translated name)
    _user_dirs(home / ".config", '# written by xdg-user-dirs-update\n'
               'XDG_DESKTOP_DIR="$HOME/Bureau"\n'
               'XDG_DOWNLOAD_DIR="$HOME/Téléchargements"\n')
    assert default_downloads_dir() == home / "Téléchargements" / "chatroom"

    # XDG_CONFIG_HOME wins, and its file points somewhere else entirely
    config = tmp_path / "cfg"
    elsewhere = tmp_path / "elsewhere" / "dl"
    _user_dirs(config, f'XDG_DOWNLOAD_DIR="{elsewhere}"\n')
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config))
    assert default_downloads_dir() == elsewhere / "chatroom"

    # a disabled entry ($HOME itself), a relative one, a comment: ~/Downloads
    for text in ('XDG_DOWNLOAD_DIR="$HOME/"\n', 'XDG_DOWNLOAD_DIR="$HOME"\n',
                 'XDG_DOWNLOAD_DIR="relative/dl"\n', '# XDG_DOWNLOAD_DIR="/srv/x"\n',
                 "not a config file at all\n"):
        _user_dirs(config, text)
        assert default_downloads_dir() == home / "Downloads" / "chatroom", text

    # a ClientCore without --downloads uses it (and creates nothing yet)
    _user_dirs(config, f'XDG_DOWNLOAD_DIR="{elsewhere}"\n')
    core = chatroom.ClientCore(lambda event: None)
    try:
        assert core.downloads == elsewhere / "chatroom"
    finally:
        core.stop()                         # never started: only lets go of its threads
    assert not elsewhere.exists()
