#!/usr/bin/env python3
"""chatroom: a LAN chat room in one file.

One script is both ends. ``python chatroom.py --host`` runs a room host that
advertises itself on the LAN by mDNS (``_chatroom._tcp.local.``);
``python chatroom.py --cli --room R --user U`` finds a host by itself and joins
room R as user U from a terminal; ``python chatroom.py --discover`` lists the
hosts on the LAN; with no arguments it opens the desktop window. People in a
room chat in any language and are told by ``[SYSTEM]`` notices, which nobody
can fake, who comes and goes; they send files, and call each other with
video and voice, peer to peer over UDP or through the host when UDP can't
get through, every media packet sealed; client and host speak TLS 1.3, the
host's key pinned on first use. Only the standard library is needed to
import this file; zeroconf enables discovery, PySimpleGUI the window,
cryptography a host's first key, and cryptography, numpy, OpenCV, PyAV and
PyAudio the calls, livekit their echo cancelling, and tkinterdnd2 files
dropped on the window (each is imported where it is used, and a missing
one is named in a friendly error; calls go on without livekit, the window
without drops).

The file reads top to bottom; each section uses only the sections above it
(tests/test_map.py holds this map and that rule true):

 1. LIMITS AND DEFAULTS   every tunable, error classes, small helpers
 2. FIELD RULES           one rule per field name, for every event (pure)
 3. WIRE PROTOCOL         frames, events, the Wire state machine (sans-I/O)
 4. NAMES AND TEXT        IDs, look-alikes, messages, file names (pure)
 5. ROOMS                 members, history, help, passwords (pure)
 6. CALLS                 invitations, links and groups (pure)
 7. MEDIA PACKETS         sealing, key agreement, fragments, reassembly (pure)
 8. MEDIA FLOW            control messages, repair, rate, statistics (pure)
 9. PLAYOUT               the jitter buffer, lip sync, voice levels (pure)
10. DISCOVERY             mDNS advertise and browse (zeroconf)
11. VIDEO DEVICES         test pattern, cameras, files; VP8 and JPEG
12. SOUND DEVICES         Opus and PCM, microphones, speakers, recording
13. CONNECTIONS           Link (framed TCP, three lanes, one writer), UDP sockets
14. HOST RELAYS           files and calls between the members of a room
15. HOST                  the listener, sessions, rooms, shutdown (asyncio)
16. CLIENT FILES          files we send and receive, beside the client core
17. CLIENT MEDIA          links, sealed packets in and out, the media threads
18. CLIENT CALLS          host-arranged and direct calls over the engine
19. CLIENT PLACE          where a client is, on disk too; host frames to events
20. CLIENT CORE           one asyncio loop in a thread, one event stream
21. COMMANDS              one parser for what a person types
22. TERMINAL CLIENT       --cli: stdin lines in, events out (text or JSON)
23. GUI LOOK              theme, fonts, --scale, the trace hook, drawing
24. GUI CONVERSATION      bubbles, notices, file cards, links, pictures, copying
25. GUI MEMBERS           the members list and the emoji picker
26. GUI PANELS            message box, help panel, search, notifications, drops
27. GUI WINDOWS           shared widgets and the launcher
28. GUI CHAT WINDOW       conversations, the members, the input line
29. GUI CALLS             the call window: tiles, who speaks, ESC and Backspace
30. GUI PLUMBING          settings, the bridge from the core, opening, phases
31. GUI APP               the one core, the windows, the one read loop
32. MAIN                  argparse and the entry points
"""

from __future__ import annotations

__version__ = "0.1.0"

import argparse
import asyncio
import bisect
import collections
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import dataclasses
import datetime
import enum
import errno
import functools
import glob
import hashlib
import hmac
import importlib.util
import ipaddress
import itertools
import json
import logging
import math
import os
import random
import re
import secrets
import shutil
import signal
import socket
import ssl
import stat
import struct
import sys
import tempfile
import threading
import time
import typing
import unicodedata
import wave
from collections.abc import Awaitable, Callable, Iterable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar, Protocol

log = logging.getLogger("chatroom")


# =============================================================================
# 1. LIMITS AND DEFAULTS: every tunable, the error classes, small helpers
# =============================================================================
# The numbers a maintainer looks for first, in one place. The first block is
# fixed by the protocol: changing one changes the wire. The rest are
# tunables: each is a field of `Limits`, with the constant as its default,
# and the code below reads it from the Limits it was given, never from the
# global, so tests can use small limits without patching anything. Those a
# person might want to change have a command-line flag in MAIN.

MIN_PYTHON = (3, 11)                # the pinned packages need it (numpy 2.4, ...)

# --- Fixed by the protocol ---------------------------------------------------

PROTOCOL_VERSION = 1                # bumped on any incompatible wire change
DEFAULT_PORT = 47300                # TCP port of a host (--port; 0 = any free)
SERVICE_TYPE = "_chatroom._tcp.local."
MAX_FRAME_BYTES = 256 * 1024        # largest frame body, unless Limits allow more
MAX_CHUNK_BYTES = 64 * 1024         # file data per frame: text overtakes files
MAX_ID_CHARS = 32                   # User and Room IDs, after NFC
MAX_ROOM_MEMBERS_CAP = 1024         # most members a room may be set to hold: a
                                    # Welcome naming them all fits one frame
MAX_ROOMS_LISTED = 1024             # rooms read from one host's mDNS record, at most
MAX_PASSWORD_CHARS = 256            # a room password, after NFC

# --- Tunables: the defaults of Limits ----------------------------------------

MAX_MESSAGE_BYTES = 16 * 1024       # largest chat text, in UTF-8 bytes
MAX_ROOM_MEMBERS = 256              # a room past this refuses new members
MAX_SESSIONS = 1024                 # connections a host holds at once
HISTORY_LIMIT = 100                 # messages replayed to a late joiner
GRACE_S = 60.0                      # a dropped member's seat is held this long
RETRY_FOR_S = 300.0                 # a terminal client tries to get back this long
RECONNECT_FIRST_S = 0.5             # the first retry comes within this, jittered
RECONNECT_MAX_S = 10.0              # the backoff between retries stops growing here
REDISCOVER_S = 1.5                  # a reconnecting client looks for its host by name this long
SAID_IDS_KEPT = 20000               # per room: message ids confirmed again, never doubled
RESUME_LOG_EVENTS = 5000            # room events kept for members who come back
RESUME_LOG_BYTES = 8 * 1024 * 1024  # ... and at most this much of their text
PASSWORD_DELAY_S = 1.0              # a wrong room password: that address waits this long,
PASSWORD_DELAY_MAX_S = 30.0         # doubled for each wrong one in a row, up to this
PASSWORD_THREADS = 2                # a host's threads for scrypt (16 MiB each while busy)

MAX_PER_ADDRESS = 64                # connections at once from one source address
MAX_PENDING = 128                   # connections not yet logged in, from anywhere
MAX_PENDING_PER_ADDRESS = 16        # ... and from one source address
LISTEN_BACKLOG = 1024               # connections the kernel queues before we accept them
ACCEPT_PAUSE_S = 0.1                # out of descriptors, nothing to refuse: look again then
RATE_LIMIT_PER_S = 10.0             # chat lines one member may send per second, sustained
BURST = 20                          # ... and at once, after a quiet while
FLOOD_STRIKES = 100                 # refused lines (forgiven at the rate) before "flooding"

HELLO_TIMEOUT_S = 5.0               # a login must finish within this
CONNECT_TIMEOUT_S = 5.0             # client: TCP connect + login
PING_INTERVAL_S = 15.0              # host pings a connection this quiet
PEER_SILENCE_S = 45.0               # no byte for this long: the peer is gone
CLOSE_TIMEOUT_S = 2.0               # flushing goodbyes before aborting
OUTBOX_LIMIT_BYTES = 4 * 1024 * 1024  # queued for one peer before "too slow"
SEND_STALL_S = 20.0                 # queued bytes, no progress: "too slow"
TICK_S = 1.0                        # host housekeeping period, at most

WRITE_BATCH_BYTES = 256 * 1024      # frames handed to a transport at once
TRANSPORT_HIGH_WATER = 512 * 1024   # a transport's own buffer, before we wait
INCOMING_LIMIT_BYTES = 2 * 1024 * 1024  # decoded but unhandled: stop reading,
INCOMING_LIMIT_EVENTS = 4096        # or this many events waiting

DISCOVERY_TIMEOUT_S = 2.0           # --discover listens this long
DISCOVERY_SETTLE_S = 0.6            # --cli stops browsing this long after a find
ADVERTISE_DEBOUNCE_S = 0.5          # coalesce TXT updates as rooms change
RESOLVE_TIMEOUT_S = 1.5             # one mDNS resolve of a host, at most
HOST_CHECK_S = 10.0                 # a listed host is dialled this often (is it alive?)
HOST_CHECK_MISSES = 2               # unanswered dials in a row before it shows as gone

MAX_FILE_SIZE = 4 * 1024 ** 3       # largest file a host relays (--max-file-size)
FILE_IO_BYTES = 1024 * 1024         # one disk read or write of a file
BULK_HIGH_WATER = 1024 * 1024       # file bytes queued for one peer at most
RELAY_WINDOW_BYTES = 4 * 1024 * 1024  # a host keeps this much of a file in memory,
RELAY_WINDOW_MAX_BYTES = 16 * 1024 ** 2  # or this much while recipients drift apart
MAX_TRANSFERS = 8                   # uploads in progress per session
PROGRESS_INTERVAL_S = 0.25          # file_progress events per transfer, at most
DISK_QUEUE_WRITES = 4               # a download's writes queued before reading pauses
HOST_IO_THREADS = 4                 # a host's threads for spool files

CALL_TIMEOUT_S = 60.0               # an invitation waits this long (--call-timeout)
MAX_CALL_SIZE = 6                   # people in one call (--max-call-size)
MEDIA_LANE_BYTES = 256 * 1024       # relayed media queued for one peer; oldest goes first
MEDIA_FALLBACK_S = 3.0              # no media over UDP this long: ask for the relay
MEDIA_SILENCE_S = 5.0               # no media at all this long: the link is lost
MEDIA_STATS_S = 1.0                 # media_stats per link, this often
KEEPALIVE_S = 1.0                   # with nothing else to send, a keepalive this often

GUI_MAX_SHOWN = 1000                # chat entries kept on screen; older ones go
GUI_STOP_WAIT_S = 4.0               # closing: wait this long for the core, then go
GUI_ASK_ABOVE = 100 * 1024 ** 2     # the window asks before files larger than this

# --- Fixed by design: named, but not worth a knob ----------------------------

RECONNECT_JITTER = (0.5, 1.0)       # each backoff is scaled by a random factor in this range
OWN_RATE_SHARE = 0.9                # our client paces itself this far under the host's rate,
OWN_BURST_MARGIN = 2                # ... and this many lines under its burst


@dataclasses.dataclass(frozen=True)
class Limits:
    """The tunables a host or client runs with; defaults are the constants
    above, and MAIN builds one from the command-line flags."""
    max_frame_bytes: int = MAX_FRAME_BYTES
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_room_members: int = MAX_ROOM_MEMBERS
    max_sessions: int = MAX_SESSIONS
    max_per_address: int = MAX_PER_ADDRESS          # 0: no limit
    max_pending: int = MAX_PENDING                  # 0: no limit
    max_pending_per_address: int = MAX_PENDING_PER_ADDRESS  # 0: no limit
    listen_backlog: int = LISTEN_BACKLOG
    accept_pause_s: float = ACCEPT_PAUSE_S
    rate_limit_per_s: float = RATE_LIMIT_PER_S      # 0: no flood control
    burst: int = BURST                              # 0: no flood control
    flood_strikes: int = FLOOD_STRIKES
    history_limit: int = HISTORY_LIMIT
    grace_s: float = GRACE_S
    retry_for_s: float = RETRY_FOR_S    # 0: don't retry; math.inf: for ever (the window)
    reconnect_first_s: float = RECONNECT_FIRST_S
    reconnect_max_s: float = RECONNECT_MAX_S
    rediscover_s: float = REDISCOVER_S
    said_ids_kept: int = SAID_IDS_KEPT
    resume_log_events: int = RESUME_LOG_EVENTS
    resume_log_bytes: int = RESUME_LOG_BYTES
    password_delay_s: float = PASSWORD_DELAY_S
    password_delay_max_s: float = PASSWORD_DELAY_MAX_S
    password_threads: int = PASSWORD_THREADS
    hello_timeout_s: float = HELLO_TIMEOUT_S
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    ping_interval_s: float = PING_INTERVAL_S
    peer_silence_s: float = PEER_SILENCE_S
    close_timeout_s: float = CLOSE_TIMEOUT_S
    outbox_limit_bytes: int = OUTBOX_LIMIT_BYTES
    send_stall_s: float = SEND_STALL_S
    tick_s: float = TICK_S
    write_batch_bytes: int = WRITE_BATCH_BYTES
    transport_high_water: int = TRANSPORT_HIGH_WATER
    incoming_limit_bytes: int = INCOMING_LIMIT_BYTES
    incoming_limit_events: int = INCOMING_LIMIT_EVENTS
    discovery_settle_s: float = DISCOVERY_SETTLE_S
    advertise_debounce_s: float = ADVERTISE_DEBOUNCE_S
    resolve_timeout_s: float = RESOLVE_TIMEOUT_S
    host_check_s: float = HOST_CHECK_S
    host_check_misses: int = HOST_CHECK_MISSES
    max_file_size: int = MAX_FILE_SIZE
    file_io_bytes: int = FILE_IO_BYTES
    bulk_high_water: int = BULK_HIGH_WATER
    relay_window_bytes: int = RELAY_WINDOW_BYTES
    relay_window_max_bytes: int = RELAY_WINDOW_MAX_BYTES
    max_transfers: int = MAX_TRANSFERS
    progress_interval_s: float = PROGRESS_INTERVAL_S
    disk_queue_writes: int = DISK_QUEUE_WRITES
    host_io_threads: int = HOST_IO_THREADS
    call_timeout_s: float = CALL_TIMEOUT_S
    max_call_size: int = MAX_CALL_SIZE
    media_lane_bytes: int = MEDIA_LANE_BYTES
    media_fallback_s: float = MEDIA_FALLBACK_S
    media_silence_s: float = MEDIA_SILENCE_S
    media_stats_s: float = MEDIA_STATS_S
    keepalive_s: float = KEEPALIVE_S
    gui_max_shown: int = GUI_MAX_SHOWN
    gui_stop_wait_s: float = GUI_STOP_WAIT_S
    gui_ask_above: int = GUI_ASK_ABOVE


# Codes a peer or a script may see, in `error{code,message}` events (and
# `insecure`, in `warning` events).
# A test (or a bot) matches on the code; the message is for people.
ERROR_CODES = frozenset({
    "user_taken", "bad_user_id", "bad_room_id", "room_full", "host_full",
    "message_too_long", "bad_message", "no_such_user", "version_mismatch",
    "bad_frame", "login_timeout", "host_unreachable", "no_host",
    "ambiguous_host", "unknown_command", "not_connected",
    "missing_package", "file_too_large", "not_a_file", "disk_full", "checksum_mismatch",
    "sender_left", "recipient_left", "file_io", "busy", "cancelled", "cannot_resume",
    "declined", "no_such_transfer",
    "host_shutdown", "too_many_connections", "rate_limited",
    "call_self", "already_in_call", "no_invitation", "not_in_call", "bad_call_address",
    "no_camera", "no_audio_device", "port_taken",
    "wrong_password", "room_not_protected",
    "host_key_changed", "tls_mismatch", "insecure",
})


class ChatError(Exception):
    """Base of every error this program raises on purpose.

    `code` is one of ERROR_CODES and is what machines match on; `message` is
    a sentence for a person.
    """

    def __init__(self, code: str, message: str) -> None:
        if code not in ERROR_CODES:         # a bug here, not the peer's: say so loudly
            raise ValueError(f"undocumented error code {code!r}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _why(exc: BaseException) -> str:
    """An exception as a person reads it: a ChatError's sentence without
    its code, an OSError's own words, anything else as it prints."""
    if isinstance(exc, ChatError):
        return exc.message
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)


def listen_error(exc: BaseException, port: int) -> tuple[str, str]:
    """(code, sentence) for a host that can't start listening on `port`."""
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return ("port_taken", f"can't host on port {port}: another program listens on it "
                "(another chatroom host?). Stop that program, or pick another port "
                "with --port N (--port 0 takes any free one)")
    if isinstance(exc, OSError) and exc.errno == errno.EACCES:
        return ("host_unreachable", f"can't host on port {port}: this system keeps ports "
                "below 1024 for administrators; pick a port above 1024 with --port N")
    return ("host_unreachable", f"can't host on port {port}: {_why(exc)}")


class ProtocolError(ChatError):
    """Someone broke the wire protocol (see LocalError, RemoteError)."""


class LocalError(ProtocolError):
    """We tried to send something the protocol forbids now: a bug on our side."""


class RemoteError(ProtocolError):
    """The peer broke the protocol; the connection must be closed."""


class Refused(ChatError):
    """A well-formed request that policy refuses (taken ID, long message...)."""


class MissingPackage(ChatError):
    """An optional package this feature needs is not installed."""

    def __init__(self, package: str, feature: str) -> None:
        super().__init__("missing_package", f"{feature} needs the {package} package: "
                         f"pip install -r requirements.txt (or pip install {package})")


def unix_now() -> float:
    """Wall-clock time in Unix seconds, millisecond precision (what `ts` holds)."""
    return round(time.time(), 3)


def config_dir(platform: str | None = None, environ: typing.Mapping[str, str] | None = None,
               home: Path | None = None) -> Path:
    """This program's folder for what it keeps between runs: %APPDATA%\\chatroom
    on Windows, ~/Library/Application Support/chatroom on macOS,
    $XDG_CONFIG_HOME/chatroom (else ~/.config/chatroom) elsewhere."""
    platform = platform or sys.platform
    if environ is None:
        environ = os.environ
    home = home or Path.home()
    if platform.startswith("win"):
        base = Path(environ.get("APPDATA") or home / "AppData" / "Roaming")
    elif platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        xdg = environ.get("XDG_CONFIG_HOME", "")
        base = Path(xdg) if os.path.isabs(xdg) else home / ".config"   # the spec:
    return base / "chatroom"                                           # relative = unset


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path`, readable by its owner only, atomically: a
    crash leaves the old file or the new one. Each write has a temporary
    file of its own (mkstemp), so two writers never rename each other's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                             dir=path.parent)     # mode 0o600
    try:
        with os.fdopen(descriptor, "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def log_failure(future: Any, what: str) -> None:
    """Log the exception of a future nobody awaits (a job handed to a thread
    pool, say), once it is done: an error must never vanish silently."""
    def done(f: Any) -> None:
        if not f.cancelled() and f.exception() is not None:
            log.error("%s failed", what, exc_info=f.exception())
    future.add_done_callback(done)


def printable(text: str) -> str:
    """`text` made safe for a terminal: controls and bidi overrides escaped.

    Text from the network may carry ANSI escapes or U+202E; printed raw they
    would recolour the terminal or reverse a line to forge another one.
    """
    out = []
    for ch in text:
        if ch in "\t":
            out.append(ch)
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's soft limit on open files as far as its hard
    limit allows: a host holds one descriptor per connection, and many
    systems start programs at 1024 (macOS at 256). Returns (before, after);
    (0, 0) where there is no such limit (Windows)."""
    try:
        import resource
    except ImportError:                     # Windows: no per-process file limit
        return (0, 0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return (soft, soft)
    # An unlimited hard limit still has a ceiling: macOS refuses more than
    # OPEN_MAX (10240) with EINVAL, so that is the second try.
    wanted = [hard] if hard != resource.RLIM_INFINITY else [1 << 20, 10240]
    for target in wanted:
        if target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return (soft, target)
        except (ValueError, OSError):
            continue
    return (soft, soft)


def address_text(host: str, port: int) -> str:
    """"host:port", with an IPv6 address in brackets: "[::1]:47300"."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_server(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """'HOST', 'HOST:PORT', '[V6]:PORT' or a bare IPv6 address -> (host, port).

    Raises ValueError with a sentence for a person.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty server address")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad server address {text!r}")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""          # a name, IPv4, or bare IPv6
    if not host:
        raise ValueError(f"bad server address {text!r}")
    if not port_text:
        if text.endswith(":"):
            raise ValueError(f"bad port in {text!r}")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in {text!r}")
    return host, int(port_text)


# --- Flood control -----------------------------------------------------------
# "A burst gets rate_limited (the line is refused, not the person); sustained
# abuse a disconnect." Lines over the rate are refused before the room sees
# them, so they never take a seq, the history or the resume log.

class Verdict(enum.Enum):
    """What FloodGate.take says about one chat line."""
    PASS = "pass"                   # relay it
    REFUSE = "refuse"               # answer rate_limited; relay nothing
    FLOODING = "flooding"           # refused too often: disconnect the member


class FloodGate:
    """One member's chat lines, as a token bucket: `burst` lines at once,
    then `rate_per_s` a second. Each refused line is a strike; strikes are
    forgiven at the same rate, and more than `strikes` of them at once make
    a flood. So a member sending at twice the rate is only throttled, while
    one pasting 120 lines at once, or sending ten times the rate for about a
    second, is cut off. Time comes in as `now` (any monotonic seconds)."""

    def __init__(self, rate_per_s: float, burst: int, strikes: int) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.strikes = strikes
        self._tokens = float(burst)         # lines that may go now
        self._strikes = 0.0                 # refusals not yet forgiven
        self._at: float | None = None       # when the two were last brought up to date

    def take(self, now: float) -> Verdict:
        """Spend a token on one line, if there is one."""
        if self._at is not None:
            gained = max(0.0, now - self._at) * self.rate_per_s    # a clock never runs back
            self._tokens = min(float(self.burst), self._tokens + gained)
            self._strikes = max(0.0, self._strikes - gained)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return Verdict.PASS
        self._strikes += 1
        return Verdict.FLOODING if self._strikes > self.strikes else Verdict.REFUSE

    def wait_s(self, now: float) -> float:
        """Seconds until `take` would pass (0: now). A client paces its own
        lines with a gate like the host's, so none is refused."""
        tokens = self._tokens
        if self._at is not None:
            tokens = min(float(self.burst), tokens + max(0.0, now - self._at) * self.rate_per_s)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate_per_s


# =============================================================================
# 2. FIELD RULES: one check per field name, used by every event that has it
# =============================================================================
# What a value of each protocol field may be: type, length, characters.
# WIRE PROTOCOL (next section) applies these rules to every event it
# decodes, so a value that reaches the rooms or the screen has a known
# shape. Pure: no I/O, no state. (Split from WIRE PROTOCOL when it reached
# 895 of its 900 lines.)

# One rule per field name, used by every event that has the field: a `user`
# is checked the same way wherever it appears. A rule returns the value
# (possibly normalised) or raises ValueError with the reason.

_TOKEN_RE = re.compile(r"[A-Za-z0-9_.:-]+\Z")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _rule_int(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if type(value) is not int or not low <= value <= high:
            raise ValueError(f"expected an integer in [{low}, {high}]")
        return value
    return check


def _rule_str(max_chars: int, *, empty: bool = True) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if type(value) is not str:
            raise ValueError("expected a string")
        if len(value) > max_chars:
            raise ValueError(f"longer than {max_chars} characters")
        if not empty and not value:
            raise ValueError("empty")
        if _SURROGATE_RE.search(value):     # JSON "\ud800" decodes to one
            raise ValueError("lone surrogate")
        return value
    return check


def _rule_token(max_chars: int, *, empty: bool = False) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if empty and value == "":
            return value
        if type(value) is not str or not 0 < len(value) <= max_chars \
                or not _TOKEN_RE.match(value):
            raise ValueError(f"expected 1-{max_chars} of [A-Za-z0-9_.:-]")
        return value
    return check


def _rule_hex(chars: int) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if type(value) is not str or len(value) != chars or \
                not all(ch in "0123456789abcdef" for ch in value):
            raise ValueError(f"expected {chars} lower-case hex digits")
        return value
    return check


def _rule_bool(value: Any) -> bool:
    if type(value) is not bool:
        raise ValueError("expected true or false")
    return value


def _rule_ts(value: Any) -> float:
    # Range first: math.isfinite(10**400) raises OverflowError, not False.
    if type(value) not in (int, float) or not 0 <= value < 2 ** 40 \
            or not math.isfinite(value):
        raise ValueError("expected a Unix time in seconds")
    return value


def _rule_seconds(value: Any) -> float:
    """A duration: 0 to a day, in seconds."""
    if type(value) not in (int, float) or not 0 <= value <= 86400 or not math.isfinite(value):
        raise ValueError("expected a number of seconds")
    return value


def _rule_list(item: Callable[[Any], Any], max_items: int) -> Callable[[Any], tuple]:
    def check(value: Any) -> tuple:
        if type(value) is not list or len(value) > max_items:
            raise ValueError(f"expected a list of at most {max_items} items")
        return tuple(item(v) for v in value)
    return check


def _rule_row(*items: Callable[[Any], Any]) -> Callable[[Any], tuple]:
    """A fixed-length list whose items follow `items`, in order."""
    def check(value: Any) -> tuple:
        if type(value) is not list or len(value) != len(items):
            raise ValueError(f"expected a list of {len(items)} items")
        return tuple(rule(v) for rule, v in zip(items, value))
    return check


_NAME = _rule_str(4 * MAX_ID_CHARS, empty=False)  # IDs proper are checked in ROOMS
_TRANSFER = _rule_int(1, 2 ** 31)
_BYTES = _rule_int(0, 2 ** 53)
_ID_LABELS = {"user": "User ID", "room": "Room ID"}
FIELD_RULES: dict[str, Callable[[Any], Any]] = {
    "version": _rule_int(0, 65535),
    "software": _rule_str(64),
    "room": _NAME,
    "user": _NAME,
    "sender": _NAME,
    "host": _rule_str(256),
    "members": _rule_list(_NAME, MAX_ROOM_MEMBERS_CAP),
    "text": _rule_str(MAX_FRAME_BYTES),
    "id": _rule_token(64),
    "seq": _rule_int(0, 2 ** 53),
    "ts": _rule_ts,
    "history": _rule_bool,
    "event": _rule_token(32),
    "code": _rule_token(40),
    "message": _rule_str(2000),
    "reason": _rule_str(200),
    "n": _rule_int(0, 2 ** 53),
    "transfer": _TRANSFER,
    "name": _rule_str(1024, empty=False),   # a file name; sanitised by receivers
    "size": _BYTES,
    "offset": _BYTES,                       # a byte position in a file
    "to": _rule_str(4 * MAX_ID_CHARS),      # "" = the whole room
    "recipient": _rule_str(4 * MAX_ID_CHARS),
    "sha256": _rule_token(64),
    "max_file_size": _rule_int(0, 2 ** 53),
    "expires": _rule_seconds,
    "peer": _NAME,
    "port": _rule_int(0, 65535),
    "address": _rule_str(64, empty=False),  # an IP address, v4 or v6
    "codecs": _rule_list(_rule_token(16), 8),
    "link": _rule_hex(8),                   # 4 bytes: names a link in media packets
    "key": _rule_hex(64),                   # 32 bytes: the link's secret
    "side": _rule_token(1),                 # "a" or "b": who derives which key
    "video": _rule_token(16, empty=True),   # the codec chosen, "" = none
    "audio": _rule_token(16, empty=True),
    "resume": _rule_token(64, empty=True),  # a resume token ("" = none)
    "seen": _rule_int(0, 2 ** 53),          # the last room seq a client got
    "grace": _rule_seconds,                 # how long a host holds a dropped member
    "rate": _rule_seconds,                  # chat lines a second a host takes (0: any)
    "burst": _rule_int(0, 2 ** 31),         # ... and at once
    "password": _rule_str(MAX_PASSWORD_CHARS),  # a room's password, "" = none
    "ask": _rule_bool,                      # files wait for the recipient's answer
    "retry_after": _rule_seconds,           # an error's "try again in", 0 = whenever
    "missed": _rule_int(0, 2 ** 53),
    "lost": _rule_int(0, 2 ** 53),
    # A resume's files: [transfer, bytes the host has, complete] of each upload,
    # [transfer, from, name, size, to] of each download still coming.
    "uploads": _rule_list(_rule_row(_TRANSFER, _BYTES, _rule_bool), 4096),
    "downloads": _rule_list(_rule_row(_TRANSFER, _NAME, _rule_str(1024, empty=False),
                                      _BYTES, _rule_str(4 * MAX_ID_CHARS)), 4096),
}

# A dataclass field whose Python name is a keyword travels under another name.
WIRE_NAMES = {"sender": "from"}


# =============================================================================
# 3. WIRE PROTOCOL: frames, events, the Wire state machine (sans-I/O)
# =============================================================================
# Bytes in -> events out; events in -> bytes out. Nothing in this section
# touches a socket, a clock or a thread, so every rule here is tested (and
# fuzzed) without a network. Need I/O? You are in the wrong section: see
# the HOST and CLIENT CORE sections.
#
# Theory of operation. A connection carries frames. A frame is a 4-byte
# big-endian body length, then the body. A body that starts with "{" is one
# UTF-8 JSON object with a "type" field naming an Event class below; a body
# that starts with 0x00 is binary data for a file transfer (issue: files),
# never base64. A header announcing more than MAX_FRAME_BYTES is refused
# before anything is buffered. Every field of every event is checked (type,
# length, characters) by the rule named after the field, so a value that
# reaches the rooms or the screen has a known shape. Unknown fields are
# ignored (a newer minor peer may add some); unknown types, missing fields,
# and fields of the wrong shape are protocol errors.
#
# The Wire keeps one state per connection; TRANSITIONS says which event each
# side may send in each state. The table is keyed by the sender's role, not
# "us/them", so the same table serves the host end and the client end.

_HEADER = struct.Struct(">I")
_DATA_TAG = 0x00
_MEDIA_TAG = 0x01
_JSON_TAG = ord("{")
MAX_MEDIA_PACKET_BYTES = 1400       # a relayed media packet (MEDIA PACKETS: ~1200)


class Role(enum.Enum):
    CLIENT = "client"
    HOST = "host"


class State(enum.Enum):
    AWAITING_HELLO = "awaiting hello"       # client has not logged in yet
    AWAITING_WELCOME = "awaiting welcome"   # login sent, answer pending
    READY = "ready"                         # in a room
    CLOSING = "closing"                     # client said bye; host may finish
    CLOSED = "closed"                       # nothing more may be sent


# --- Events ------------------------------------------------------------------

EVENT_TYPES: dict[str, type[Event]] = {}


@dataclasses.dataclass(frozen=True)
class Event:
    """One protocol message. Subclasses set TYPE, the JSON "type" field."""

    TYPE: ClassVar[str] = ""

    def to_wire(self) -> dict:
        """The JSON object for this event (field names as on the wire)."""
        out: dict[str, Any] = {"type": self.TYPE}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[WIRE_NAMES.get(field.name, field.name)] = (
                list(value) if isinstance(value, tuple) else value)
        return out

    @classmethod
    def from_wire(cls, obj: dict) -> Event:
        """Build an event from a decoded JSON object; RemoteError if malformed."""
        kind = obj.get("type")
        event_cls = EVENT_TYPES.get(kind) if type(kind) is str else None
        if event_cls is None:
            raise RemoteError("bad_frame", f"unknown message type {kind!r}")
        values = {}
        for field in dataclasses.fields(event_cls):
            key = WIRE_NAMES.get(field.name, field.name)
            if key not in obj:
                if field.default is not dataclasses.MISSING:
                    continue
                raise RemoteError("bad_frame", f"{kind}: missing field {key!r}")
            try:
                values[field.name] = FIELD_RULES[field.name](obj[key])
            except ValueError as exc:
                if kind == "hello" and key in _ID_LABELS and isinstance(obj[key], str) \
                        and len(obj[key]) > MAX_ID_CHARS:   # a person's mistake, not garbage
                    raise RemoteError(f"bad_{key}_id", f"a {_ID_LABELS[key]} has 1 to "
                                      f"{MAX_ID_CHARS} characters") from None
                raise RemoteError("bad_frame", f"{kind}.{key}: {exc}") from None
        return event_cls(**values)


def _event(cls: type[Event]) -> type[Event]:
    """Register an event class under its TYPE; every field must have a rule."""
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in FIELD_RULES]
    if missing:
        raise TypeError(f"{cls.__name__}: no FIELD_RULES for {missing}")
    EVENT_TYPES[cls.TYPE] = cls
    return cls


# Client -> host. Verbs, present tense.

@_event
@dataclasses.dataclass(frozen=True)
class Hello(Event):
    """Log in: the first frame a client sends, naming the protocol version.
    Coming back after a drop, `resume` is the token of the welcome and
    `seen` the last room seq received: the host then answers Resumed.
    `password` opens a protected room, or protects the room this login
    opens ("" = none); a resume with a valid token doesn't need it. Never
    shown in a repr, so never in a log. `ask`: see FileAnnounce."""
    TYPE = "hello"
    version: int
    room: str
    user: str
    software: str = ""
    resume: str = ""
    seen: int = 0
    password: str = dataclasses.field(default="", repr=False)
    ask: bool = False


@_event
@dataclasses.dataclass(frozen=True)
class Say(Event):
    """Send `text` to the room, or with `to` to that member alone. `id` is
    chosen by the sender and comes back in the host's confirmation, so a
    resend is recognised, never doubled."""
    TYPE = "say"
    id: str
    text: str
    to: str = ""


@_event
@dataclasses.dataclass(frozen=True)
class Who(Event):
    """Ask for the member list."""
    TYPE = "who"


@_event
@dataclasses.dataclass(frozen=True)
class Bye(Event):
    """Leave the room; the host answers with Closing and closes."""
    TYPE = "bye"


@_event
@dataclasses.dataclass(frozen=True)
class Ping(Event):
    """Are you there? Either side may ask; the other answers Pong(n)."""
    TYPE = "ping"
    n: int


@_event
@dataclasses.dataclass(frozen=True)
class Pong(Event):
    TYPE = "pong"
    n: int


# Host -> client. Their TYPE names are the client's event vocabulary
# (CLIENT CORE), so what the host says is what a script reads.

@_event
@dataclasses.dataclass(frozen=True)
class Welcome(Event):
    """Login accepted: you are `user` in `room`; `members` in join order.
    `resume` is a secret token that gets this seat back after a drop, for
    `grace` seconds (0: this host doesn't hold seats). The host takes
    `burst` chat lines at once, then `rate` a second (0: no limit): a
    client paces itself to that."""
    TYPE = "welcome"
    version: int
    room: str
    user: str
    members: tuple
    host: str = ""
    max_file_size: int = 0
    resume: str = ""
    grace: float = 0
    rate: float = 0
    burst: int = 0


@_event
@dataclasses.dataclass(frozen=True)
class Resumed(Event):
    """A resume accepted: the same seat in `room`, nobody told you left.
    The `missed` room events since `seen` follow, in order; `lost` more
    were too old to keep (0 unless the room was very busy). Files carry on:
    `uploads` says how far each of ours got ([transfer, bytes the host has,
    complete]: send the rest from there), `downloads` which files are still
    coming to us ([transfer, from, name, size, to]: answer each with a
    FileResume)."""
    TYPE = "resumed"
    room: str
    user: str
    members: tuple
    host: str = ""
    max_file_size: int = 0
    missed: int = 0
    lost: int = 0
    uploads: tuple = ()
    downloads: tuple = ()
    rate: float = 0
    burst: int = 0


@_event
@dataclasses.dataclass(frozen=True)
class Message(Event):
    """A chat message, stamped by the host. `seq` counts per room. `to`
    names the one member a private line went to ("" = the room): only the
    sender and that member are sent it."""
    TYPE = "message"
    seq: int
    id: str
    sender: str
    text: str
    ts: float
    history: bool = False
    to: str = ""


@_event
@dataclasses.dataclass(frozen=True)
class System(Event):
    """A [SYSTEM] notice: only the host can send one."""
    TYPE = "system"
    seq: int
    event: str
    user: str
    text: str
    ts: float


@_event
@dataclasses.dataclass(frozen=True)
class Help(Event):
    TYPE = "help"
    text: str


@_event
@dataclasses.dataclass(frozen=True)
class Members(Event):
    TYPE = "members"
    members: tuple


@_event
@dataclasses.dataclass(frozen=True)
class Error(Event):
    """Something was refused. `id` names the request it answers, if any;
    `retry_after`, when not 0, is how many seconds to wait before asking
    again (a wrong room password, say)."""
    TYPE = "error"
    code: str
    message: str
    id: str = "-"
    retry_after: float = 0


@_event
@dataclasses.dataclass(frozen=True)
class Closing(Event):
    """The host is closing this connection (bye answered, shutdown, ...)."""
    TYPE = "closing"
    reason: str


# Files. A transfer number names one file moving in one direction on one
# connection: the client numbers its uploads, the host numbers the
# downloads it sends; data frames (Chunk) carry the number. The sender of
# the bytes may FileAbort its transfer; the receiver may FileRefuse it.

@_event
@dataclasses.dataclass(frozen=True)
class FileOffer(Event):
    """client -> host: I want to send a file of `size` bytes to `to` (a
    user) or, with to="", to everyone else in the room. Wait for FileAccept."""
    TYPE = "file_offer"
    transfer: int
    name: str
    size: int
    to: str = ""


@_event
@dataclasses.dataclass(frozen=True)
class FileAccept(Event):
    """The receiver of the bytes: send them now (answers FileOffer, or FileAnnounce's ask)."""
    TYPE = "file_accept"
    transfer: int


@_event
@dataclasses.dataclass(frozen=True)
class FileGot(Event):
    """client -> host: the first `offset` bytes of download `transfer` are on
    our disk. Sent now and then, so the host knows what it may forget: what
    a recipient has not confirmed is kept for a resume."""
    TYPE = "file_got"
    transfer: int
    offset: int


@_event
@dataclasses.dataclass(frozen=True)
class FileResume(Event):
    """client -> host, after Resumed: go on with download `transfer` from
    byte `offset` (what we have); the host answers with the rest of the
    data and FileEnd, or FileAbort if it no longer has those bytes."""
    TYPE = "file_resume"
    transfer: int
    offset: int


@_event
@dataclasses.dataclass(frozen=True)
class FileAnnounce(Event):
    """host -> client: a file is coming to you as transfer `transfer`. With `ask` (your
    hello said it), no data comes until you answer FileAccept, or FileRefuse."""
    TYPE = "file"
    transfer: int
    sender: str
    name: str
    size: int
    to: str = ""
    ask: bool = False


@_event
@dataclasses.dataclass(frozen=True)
class FileEnd(Event):
    """Either way: all data of the transfer has been sent; this is its hash."""
    TYPE = "file_end"
    transfer: int
    sha256: str


@_event
@dataclasses.dataclass(frozen=True)
class FileAbort(Event):
    """The sender of the bytes stops its transfer (the file is not coming)."""
    TYPE = "file_abort"
    transfer: int
    code: str
    reason: str


@_event
@dataclasses.dataclass(frozen=True)
class FileRefuse(Event):
    """The receiver of the bytes refuses or failed the transfer. From the host
    about an upload, `recipient` names the one that failed ("" = all)."""
    TYPE = "file_refuse"
    transfer: int
    code: str
    reason: str
    recipient: str = ""


@_event
@dataclasses.dataclass(frozen=True)
class FileStored(Event):
    """host -> client: the host holds every byte of your upload."""
    TYPE = "file_stored"
    transfer: int


@_event
@dataclasses.dataclass(frozen=True)
class FileSaved(Event):
    """client -> host: I saved your download, size and hash verified."""
    TYPE = "file_saved"
    transfer: int


@_event
@dataclasses.dataclass(frozen=True)
class FileDelivered(Event):
    """host -> client: `user` saved your upload, verified."""
    TYPE = "file_delivered"
    transfer: int
    user: str


# Calls (CALLS). A client says once, after the welcome, where its media
# socket listens and which codecs it has (MediaPort); the host tells both
# sides of a new link the other's address, a fresh key and the codecs
# (CallStart). Media itself travels over UDP between the clients, or, when
# UDP can't get through, relayed by the host in binary frames (MediaData).

@_event
@dataclasses.dataclass(frozen=True)
class MediaPort(Event):
    """client -> host: my media socket's UDP port (0: I can't take calls)
    and the codecs I can encode and decode, best first."""
    TYPE = "media_port"
    port: int
    codecs: tuple = ()


@_event
@dataclasses.dataclass(frozen=True)
class Call(Event):
    """client -> host: /CHECK `user`: invite them, or answer their invitation."""
    TYPE = "call"
    user: str


@_event
@dataclasses.dataclass(frozen=True)
class Decline(Event):
    """client -> host: refuse `user`'s invitation."""
    TYPE = "decline"
    user: str


@_event
@dataclasses.dataclass(frozen=True)
class Hangup(Event):
    """client -> host: end my link with user `to` ("" = every link and
    invitation), because the person hung up (`hangup`) or no media came
    for too long (`lost`)."""
    TYPE = "hangup"
    to: str = ""
    reason: str = "hangup"


@_event
@dataclasses.dataclass(frozen=True)
class RelayMedia(Event):
    """Either way. client -> host: `user`'s media doesn't reach me over UDP;
    have it relayed. host -> client: relay your media to `user` from now on."""
    TYPE = "relay_media"
    user: str


@_event
@dataclasses.dataclass(frozen=True)
class CallInvite(Event):
    """host -> client: `sender` calls you ([SYSTEM] <sender> CALL YOU); the
    invitation ends in `expires` seconds unless you call back."""
    TYPE = "call_invite"
    sender: str
    expires: float = 0.0


@_event
@dataclasses.dataclass(frozen=True)
class CallMissed(Event):
    """host -> client: `sender`'s call ended before you answered."""
    TYPE = "call_missed"
    sender: str


@_event
@dataclasses.dataclass(frozen=True)
class CallFailed(Event):
    """host -> client: your call to `peer` did not connect, and why
    (busy, declined, call_full, left, lost)."""
    TYPE = "call_failed"
    peer: str
    reason: str


@_event
@dataclasses.dataclass(frozen=True)
class CallStart(Event):
    """host -> client: you and `peer` are linked. Send your media to
    `address`:`port`, sealed with `key` (hex) under link id `link` (hex);
    `side` says which direction key is yours; `video` and `audio` are the
    codecs both sides have ("" = none in common)."""
    TYPE = "call_start"
    peer: str
    address: str
    port: int
    link: str
    key: str
    side: str
    video: str = ""
    audio: str = ""


@_event
@dataclasses.dataclass(frozen=True)
class CallEnded(Event):
    """host -> client: your link with `peer` ended (hangup, left, lost)."""
    TYPE = "call_ended"
    peer: str
    reason: str


@dataclasses.dataclass(frozen=True)
class MediaData(Event):
    """A sealed media packet (MEDIA PACKETS) relayed over this connection,
    in a binary frame: 0x01 then the packet as it would cross UDP. The host
    routes it by the link id inside; it can't read it."""
    TYPE = "media_data"
    data: bytes | memoryview


@dataclasses.dataclass(frozen=True)
class Chunk(Event):
    """A piece of a file (at most MAX_CHUNK_BYTES), in a binary frame: 0x00,
    the transfer number (4 bytes, big-endian), then the raw bytes."""
    TYPE = "chunk"
    transfer: int
    data: bytes | memoryview            # a slice of what was received: no copy


# --- Transitions -------------------------------------------------------------
# (state, event class, sender role) -> next state. A pair not listed is a
# protocol error: LocalError when we send it, RemoteError when we receive it.

TRANSITIONS: dict[tuple[State, type[Event], Role], State] = {}


def _allow(state: State, role: Role, events: Iterable[type[Event]],
           then: State | None = None) -> None:
    for event_cls in events:
        TRANSITIONS[(state, event_cls, role)] = then or state


_CLIENT_IN_ROOM = (Say, Who, Ping, Pong, FileOffer, FileEnd, FileAbort, FileRefuse, FileSaved,
                   FileGot, FileResume, FileAccept, Chunk, MediaPort, Call, Decline, Hangup,
                   RelayMedia, MediaData)
_HOST_IN_ROOM = (Message, System, Help, Members, Error, Ping, Pong, FileAccept,
                 FileAnnounce, FileEnd, FileAbort, FileRefuse, FileStored, FileDelivered,
                 Chunk, CallInvite, CallMissed, CallFailed, CallStart, CallEnded, RelayMedia,
                 MediaData)

_allow(State.AWAITING_HELLO, Role.CLIENT, [Hello], State.AWAITING_WELCOME)
_allow(State.AWAITING_HELLO, Role.HOST, [Error], State.CLOSED)   # full, bad frame
_allow(State.AWAITING_WELCOME, Role.HOST, [Welcome, Resumed], State.READY)
_allow(State.AWAITING_WELCOME, Role.HOST, [Error], State.CLOSED)  # login refused
_allow(State.READY, Role.CLIENT, _CLIENT_IN_ROOM)
_allow(State.READY, Role.CLIENT, [Bye], State.CLOSING)
_allow(State.READY, Role.HOST, _HOST_IN_ROOM)
_allow(State.READY, Role.HOST, [Closing], State.CLOSED)
_allow(State.CLOSING, Role.CLIENT, [Pong])
_allow(State.CLOSING, Role.HOST, _HOST_IN_ROOM)
_allow(State.CLOSING, Role.HOST, [Closing], State.CLOSED)
# After the host has seen a broken stream it still explains why.
_allow(State.CLOSED, Role.HOST, [Error], State.CLOSED)


# --- Framing -----------------------------------------------------------------

_CHUNK_HEADER = struct.Struct(">IBI")    # frame length, 0x00, transfer


def chunk_header(transfer: int, size: int) -> bytes:
    """The bytes that go before `size` bytes of file data in a Chunk frame.

    Kept apart from the data so a chunk is written without being copied.
    """
    return _CHUNK_HEADER.pack(size + 5, _DATA_TAG, transfer)


def encode(event: Event) -> bytes:
    """One complete frame (header and body) for `event`.

    Raises LocalError if a field can't travel (a lone surrogate, NaN).
    """
    if isinstance(event, Chunk):
        return chunk_header(event.transfer, len(event.data)) + bytes(event.data)
    if isinstance(event, MediaData):
        if not 0 < len(event.data) <= MAX_MEDIA_PACKET_BYTES:
            raise LocalError("bad_frame", f"a media packet of {len(event.data)} bytes")
        return _HEADER.pack(len(event.data) + 1) + bytes((_MEDIA_TAG,)) + bytes(event.data)
    try:
        body = json.dumps(event.to_wire(), ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False).encode("utf-8")
    except (UnicodeEncodeError, ValueError) as exc:
        raise LocalError("bad_frame", f"can't encode {event.TYPE!r}: {exc}") from None
    return _HEADER.pack(len(body)) + body


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


def decode_body(body: bytes) -> Event:
    """The event in one frame body. Raises RemoteError, never anything else."""
    if not body:
        raise RemoteError("bad_frame", "empty frame")
    if body[0] == _DATA_TAG:
        if not 5 <= len(body) <= MAX_CHUNK_BYTES + 5:
            raise RemoteError("bad_frame", f"data frame of {len(body)} bytes")
        transfer = int.from_bytes(body[1:5], "big")
        if not 1 <= transfer <= 2 ** 31:
            raise RemoteError("bad_frame", "data frame for transfer 0")
        return Chunk(transfer, memoryview(body)[5:])    # file data: never copied
    if body[0] == _MEDIA_TAG:
        if not 1 < len(body) <= MAX_MEDIA_PACKET_BYTES + 1:
            raise RemoteError("bad_frame", f"media frame of {len(body)} bytes")
        return MediaData(bytes(body[1:]))
    if body[0] != _JSON_TAG:
        raise RemoteError("bad_frame", f"unknown frame kind 0x{body[0]:02x}")
    try:
        obj = json.loads(str(body, "utf-8"), parse_constant=_reject_constant,
                         object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError:
        raise RemoteError("bad_frame", "frame is not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise RemoteError("bad_frame", f"frame is not JSON ({exc})") from None
    if type(obj) is not dict:
        raise RemoteError("bad_frame", "frame is not a JSON object")
    return Event.from_wire(obj)


class FrameDecoder:
    """Splits a byte stream into frame bodies, refusing oversized ones early.

    A body that lies whole inside one piece of received data comes back as
    a memoryview of it, without a copy (file data is most of the traffic);
    only a frame split across reads is assembled in a buffer.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._partial = bytearray()     # the start of a frame split across reads
        self._need = 0                  # its whole size, header included, once known

    @property
    def pending(self) -> int:
        """Bytes held that do not make a whole frame yet."""
        return len(self._partial)

    def _frame_size(self, header: Any) -> int:
        (size,) = _HEADER.unpack_from(header)
        if size > self.max_frame_bytes:
            raise RemoteError("bad_frame", f"frame of {size} bytes announced; "
                              f"the limit is {self.max_frame_bytes}")
        return _HEADER.size + size

    def feed(self, data: bytes) -> list[Any]:
        """Add bytes; return the bodies (bytes-like) of every frame now complete.

        Raises RemoteError when a header announces more than the limit; the
        body is then never buffered, so a 4 GiB prefix costs nothing.
        """
        view = memoryview(data)
        bodies: list[Any] = []
        if self._partial:
            view = self._continue(view, bodies)
        position, length = 0, len(view)
        while length - position >= _HEADER.size:
            end = position + self._frame_size(view[position:position + _HEADER.size])
            if end > length:
                break
            bodies.append(view[position + _HEADER.size:end])
            position = end
        if position < length:
            self._partial += view[position:]
            self._need = 0
            if len(self._partial) >= _HEADER.size:
                self._need = self._frame_size(self._partial)
        return bodies

    def _continue(self, view: memoryview, bodies: list[Any]) -> memoryview:
        """Complete the split frame from `view`; return what is left of it."""
        partial = self._partial
        if not self._need:
            take = _HEADER.size - len(partial)
            partial += view[:take]
            view = view[take:]
            if len(partial) < _HEADER.size:
                return view
            self._need = self._frame_size(partial)
        take = self._need - len(partial)
        partial += view[:take]
        if len(partial) == self._need:
            bodies.append(bytes(partial[_HEADER.size:]))
            self._partial = bytearray()
            self._need = 0
        return view[take:]


class Wire:
    """One end of a chatroom connection. Owns no socket and never blocks.

    Feed what the socket read to `receive`; write what `send` returns.
    """

    def __init__(self, role: Role, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.role = role
        self.peer_role = Role.HOST if role is Role.CLIENT else Role.CLIENT
        self.state = State.AWAITING_HELLO
        self._decoder = FrameDecoder(max_frame_bytes)

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer (b"" = end of stream); return whole events.

        Returns the events completed by `data`, in order; at end of stream the
        state becomes CLOSED. Raises RemoteError if the peer broke the
        protocol (garbage, an oversized or half frame, an event not allowed
        now), after which the Wire is CLOSED and the caller must close the
        connection. If this raises anything else, that is a bug.
        """
        if not data:
            half = self._decoder.pending
            self.state = State.CLOSED
            if half:
                raise RemoteError("bad_frame", f"connection closed inside a frame "
                                  f"({half} bytes pending)")
            return []
        if self.state is State.CLOSED:
            raise RemoteError("bad_frame", "data after the connection closed")
        try:
            events = [decode_body(body) for body in self._decoder.feed(data)]
            for event in events:
                self._advance(event, self.peer_role, RemoteError)
        except RemoteError:
            self.state = State.CLOSED
            raise
        return events

    def send(self, event: Event) -> bytes:
        """The frame for `event`, after checking that we may send it now.

        Raises LocalError if the protocol forbids it in this state, or if the
        event can't be encoded (a bug in the caller); the state is then
        unchanged.
        """
        frame = encode(event)
        self.check_send(event)
        return frame

    def allows(self, event: Event) -> bool:
        """May we send `event` now? (Nothing changes; `check_send` moves.)"""
        return (self.state, type(event), self.role) in TRANSITIONS

    def check_send(self, event: Event) -> None:
        """Advance the state for an event we are about to send (see `send`).

        Split from `send` so a broadcast encodes one frame for many Wires.
        """
        self._advance(event, self.role, LocalError)

    def _advance(self, event: Event, sender: Role, error: type[ProtocolError]) -> None:
        key = (self.state, type(event), sender)
        if key not in TRANSITIONS:
            raise error("bad_frame", f"can't handle {event.TYPE!r} from the "
                        f"{sender.value} when state={self.state.value}")
        self.state = TRANSITIONS[key]


# =============================================================================
# 4. NAMES AND TEXT: IDs, messages and file names as Unicode sees them (pure)
# =============================================================================
# What a name or a line of text may be, and when two names are one: the
# rules people can be deceived by, kept apart from the rooms that use them.
# Pure functions of their text; no I/O.
#
# The rules, also in README.md:
# - "A User ID is 1-32 characters after NFC normalisation: letters of any
#   script, digits, space, `_ - .`; no control, format or bidi characters, no
#   leading or trailing space; compared case-insensitively." Combining marks
#   may follow a letter (scripts such as Devanagari need them). Room IDs
#   follow the same rules.
# - "SYSTEM in any case, or a name that imitates it, is refused as a User ID."
# - "Two IDs that look alike are one ID": they are compared by Unicode's
#   confusable skeleton (UTS #39), so `аlice` with a Cyrillic а is taken
#   while `alice` is in the room. "An ID may mix scripts only as UTS #39's
#   highly restrictive level allows" (Latin with Han and kana, with Han and
#   Bopomofo, with Han and Hangul); invisible characters (Unicode's
#   default-ignorables, such as the Hangul filler U+3164) are refused.
# - Messages: blank-looking text is refused, line separators become "\n"
#   (check_text); file names from the network are made safe (safe_filename).
# The Unicode data these rules need sit at the end of this section, written
# from Unicode's own files by tools/unicode_tables.py.

_ID_PUNCTUATION = frozenset(" _-.")
_MAX_MARKS_IN_A_ROW = 3
# UTS #39 5.1: Han, kana, Hangul and Bopomofo also count as these writing
# systems, so that Japanese (Jpan), Korean (Kore) and Han with Bopomofo
# (Hanb) mix as they are written.
_AUGMENTED = {"Hani": ("Hanb", "Jpan", "Kore"), "Hira": ("Jpan",), "Kana": ("Jpan",),
              "Hang": ("Kore",), "Bopo": ("Hanb",)}
_ANY_SCRIPT = frozenset({"Zyyy", "Zinh"})       # Common and Inherited go with any script
# Not look-alikes in Unicode's data, but read as letters in "5Y5T3M".
_DIGITS_AS_LETTERS = str.maketrans("573", "ste")


@functools.cache
def _unicode_tables() -> tuple[dict[str, str], list[int], list[frozenset[str]],
                               list[int]]:
    """The tables at the end of this section, parsed once: confusable ->
    prototype; the first code point of each script range and its script
    set; the bounds of the default-ignorable ranges (start, end + 1, ...)."""
    prototype: dict[str, str] = {}
    for item in _CONFUSABLE_TABLE.split():
        target, _, sources = item.partition("=")
        text = "".join(chr(int(h, 16)) for h in target.split("+"))
        prototype.update((chr(int(h, 16)), text) for h in sources.split(","))
    spans: list[tuple[int, int, frozenset[str]]] = []
    for item in _SCRIPT_TABLE.split():
        names, _, ranges = item.partition("=")
        scripts = frozenset(x for name in names.split("+")
                            for x in (name, *_AUGMENTED.get(name, ())))
        for span in ranges.split(","):
            first, _, last = span.partition("-")
            spans.append((int(first, 16), int(last or first, 16), scripts))
    starts: list[int] = []
    sets: list[frozenset[str]] = []
    for low, high, scripts in sorted(spans):
        starts += [low, high + 1]
        sets += [scripts, frozenset({"Zzzz"})]      # between ranges: Unknown
    bounds: list[int] = []
    for span in _IGNORABLE_TABLE.split():
        first, _, last = span.partition("-")
        bounds += [int(first, 16), int(last or first, 16) + 1]
    return prototype, starts, sets, bounds


def _scripts_of(ch: str) -> frozenset[str]:
    """The augmented Script_Extensions of a letter, mark or digit."""
    _, starts, sets, _ = _unicode_tables()
    index = bisect.bisect_right(starts, ord(ch)) - 1
    return sets[index] if index >= 0 else frozenset({"Zzzz"})


def is_ignorable(ch: str) -> bool:
    """True for Unicode's default-ignorable characters (drawn as nothing)."""
    return bisect.bisect_right(_unicode_tables()[3], ord(ch)) % 2 == 1


def skeleton(text: str) -> str:
    """UTS #39's skeleton: NFD, each character replaced by its prototype in
    confusables.txt, NFD again. Two strings that look alike have the same
    skeleton ("аlice" with a Cyrillic а, "alice"; "ΑΙ" and "AI")."""
    prototype = _unicode_tables()[0]
    return unicodedata.normalize("NFD", "".join(
        prototype.get(ch, ch) for ch in unicodedata.normalize("NFD", text)))


def mixes_scripts(name: str) -> bool:
    """True when `name` mixes scripts beyond UTS #39's highly restrictive
    level (5.2): its letters must share a script, or leaving out those that
    are Latin, share Japanese, Korean or Han with Bopomofo ("alice张" is
    fine, "аlice" with a Cyrillic а is not). Digits from two decimal
    systems mix too (5.3: "1" and the Bengali "১")."""
    resolved: frozenset[str] | None = None          # None: any script so far
    without_latin: frozenset[str] | None = None
    zeros = set()
    for ch in unicodedata.normalize("NFD", name):
        category = unicodedata.category(ch)
        if category == "Nd":
            zeros.add(ord(ch) - unicodedata.digit(ch))
        elif category[0] not in "LM":
            continue                                # " _-.": any script
        scripts = _scripts_of(ch)
        if scripts & _ANY_SCRIPT:
            continue
        resolved = scripts if resolved is None else resolved & scripts
        if "Latn" not in scripts:
            without_latin = scripts if without_latin is None else without_latin & scripts
    if len(zeros) > 1:
        return True
    if resolved is None or resolved:
        return False
    return without_latin is None or not without_latin & {"Jpan", "Kore", "Hanb"}


def check_id(raw: str, kind: str) -> str:
    """The display form of a User or Room ID, or Refused(bad_<kind>_id).

    `kind` is "user" or "room". The result is NFC-normalised; compare two
    IDs with `id_key`, never with ==.
    """
    code = f"bad_{kind}_id"
    label = "User ID" if kind == "user" else "Room ID"
    name = unicodedata.normalize("NFC", raw)
    if not 1 <= len(name) <= MAX_ID_CHARS:
        raise Refused(code, f"a {label} has 1 to {MAX_ID_CHARS} characters")
    if name != name.strip():
        raise Refused(code, f"a {label} can't start or end with a space")
    marks = 0                       # combining marks since the last base letter
    after_letter = False
    for ch in name:
        category = unicodedata.category(ch)
        if is_ignorable(ch):
            raise Refused(code, f"a {label} can't hold invisible characters "
                          f"(U+{ord(ch):04X})")
        if category[0] == "M":
            marks += 1
            if not after_letter or marks > _MAX_MARKS_IN_A_ROW:
                raise Refused(code, f"a {label} can't have stray combining marks")
            continue
        marks = 0
        after_letter = category[0] == "L"
        if not (after_letter or category == "Nd" or ch in _ID_PUNCTUATION):
            raise Refused(code, f"a {label} may hold letters, digits, space and "
                          f"_ - . (not U+{ord(ch):04X})")
    if mixes_scripts(name):
        if kind == "user" and imitates_system(name):
            raise Refused(code, "SYSTEM, and names that look like it, are kept for the "
                          "host's notices")
        raise Refused(code, f"a {label} can't mix letters of different scripts "
                      "(a look-alike of another name?)")
    return name


def id_key(name: str) -> str:
    """The identity of an ID: two IDs are the same when their keys are equal.

    NFKC folds width and compatibility forms ("ａｌｉｃｅ" is "alice"),
    casefold makes "Alice" and "alice" one name, and the skeleton makes
    look-alikes one ("аlice" with a Cyrillic а). See also `look_key`.
    """
    return skeleton(unicodedata.normalize("NFKC", name).casefold()).casefold()


def look_key(name: str) -> str:
    """A second identity: the skeleton taken before case is folded, which
    catches what casefolding first hides (Cyrillic "Т" looks like "T", but
    its lower case "т" like "ᴛ"; "I" looks like "l"). Two IDs with equal
    `id_key` or equal `look_key` are one name."""
    return skeleton(skeleton(unicodedata.normalize("NFKC", name)).casefold()).casefold()


def _small_capital_letter(ch: str) -> str:
    """"t" for "ᴛ" (LATIN LETTER SMALL CAPITAL T); "" for other characters."""
    letter = unicodedata.name(ch, "").partition("LATIN LETTER SMALL CAPITAL ")[2]
    return letter.lower() if len(letter) == 1 else ""


@functools.cache
def _small_capital(ch: str) -> str:
    """The letter a Latin small capital reads as ("ᴛ": "t"), also for the
    prototype of a small capital's look-alikes ("ʍ", for "ᴍ"); else ch."""
    for source, target in [(ch, ch), *_unicode_tables()[0].items()]:
        if target == ch and _small_capital_letter(source):
            return _small_capital_letter(source)
    return ch


def _system_form(name: str) -> str:
    """`name` without separators, accents and case, digits and small
    capitals read as letters, as a skeleton."""
    text = "".join(ch for ch in unicodedata.normalize("NFKC", name)
                   if ch not in _ID_PUNCTUATION).translate(_DIGITS_AS_LETTERS)
    return look_key("".join(
        _small_capital(ch) for ch in unicodedata.normalize("NFKD", skeleton(text))
        if unicodedata.category(ch)[0] != "M"))


def imitates_system(name: str) -> bool:
    """True for SYSTEM, "System", "S.Y.S.T.E.M", "ЅYЅТЕМ", "5Y5TEM", "ꜱʏꜱᴛᴇᴍ"
    and such: compared by skeleton, without separators and accents."""
    return _system_form(name) == _system_form("system")


# What a message can't be made of alone: blanks, and characters drawn as
# nothing (default-ignorables such as U+3164) or as an empty cell (U+2800,
# the blank Braille pattern).
_BLANK_LOOKING = frozenset("\u2800")
# "U+2028 and U+2029 (line and paragraph separators) become a newline": a
# JSON consumer or a terminal that splits lines on "\n" sees them as lines.
_LINE_SEPARATORS = str.maketrans({"\u2028": "\n", "\u2029": "\n"})


def check_text(text: str, max_bytes: int) -> str:
    """A chat text fit to broadcast, or Refused(message_too_long | bad_message).

    "A message over the size limit is refused with message_too_long, never
    cut silently." Tabs and newlines are kept, line and paragraph separators
    become newlines; other control characters and bidi overrides are
    refused, since they could make the text display as something it is not,
    and so is a text that looks blank.
    """
    if _SURROGATE_RE.search(text):          # undecodable input, e.g. from stdin
        raise Refused("bad_message", "message is not valid Unicode text")
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise Refused("message_too_long",
                      f"message is {size} bytes; the limit is {max_bytes}")
    text = text.translate(_LINE_SEPARATORS)
    if all(ch.isspace() or ch in _BLANK_LOOKING or is_ignorable(ch) for ch in text):
        raise Refused("bad_message", "message is empty")
    for ch in text:
        if ch not in "\t\n" and unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co"):
            raise Refused("bad_message",
                          f"message holds control character U+{ord(ch):04X}")
    return text


# --- File names --------------------------------------------------------------
# "Saved names are sanitised: no path parts (../../etc/passwd, ..\\..\\x,
# absolute paths), no control characters, no Windows reserved names (CON,
# NUL.txt, ...), no trailing dots or spaces, a capped length; a dot-file
# arrives visible; an existing file is never overwritten (name (1).ext)."

MAX_FILE_NAME_BYTES = 180           # leaves room for " (123)" and ".part" suffixes
_WINDOWS_FORBIDDEN = frozenset('<>:"/\\|?*')
_WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{dev}{n}" for dev in ("COM", "LPT") for n in "0123456789¹²³"])


def safe_filename(name: str) -> str:
    """A name that is safe to create in a downloads folder on any system.

    Only the last path component survives (either slash); control, format
    and bidi characters go; characters Windows forbids become "_"; leading
    dots (hidden files) and trailing dots and spaces go; a reserved device
    name gets a "_" in front; the result fits MAX_FILE_NAME_BYTES of UTF-8,
    keeping the extension. Never empty: "file" if nothing is left.
    """
    name = unicodedata.normalize("NFC", name)
    name = re.split(r"[/\\]", name)[-1]
    name = "".join("_" if ch in _WINDOWS_FORBIDDEN else ch for ch in name
                   if unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn",
                                                       "Zl", "Zp"))
    name = _fit(_trim_ends(name))
    # Last, so no later step can turn the name into a device ("nul" + spaces + "x").
    if name.partition(".")[0].rstrip(" ").upper() in _WINDOWS_RESERVED:
        name = _fit("_" + name)
    return name or "file"


def _fit(name: str) -> str:
    """`name` cut to MAX_FILE_NAME_BYTES of UTF-8, keeping a short extension."""
    if len(name.encode("utf-8")) <= MAX_FILE_NAME_BYTES:
        return name
    base, dot, ext = name.rpartition(".")
    if not dot or len(ext.encode("utf-8")) > 16:
        base, ext = name, ""
    suffix = f".{ext}" if ext else ""
    budget = MAX_FILE_NAME_BYTES - len(suffix.encode("utf-8"))
    return _trim_ends(base.encode("utf-8")[:budget].decode("utf-8", "ignore") + suffix)


def _trim_ends(name: str) -> str:
    """No whitespace (any kind) at either end, no dot first or last: repeated,
    because each rule can expose work for another (". .bashrc")."""
    while True:
        trimmed = name.strip().lstrip(".").rstrip(".").strip()
        if trimmed == name:
            return name
        name = trimmed


def numbered_names(name: str) -> Iterable[str]:
    """name.ext, then "name (1).ext", "name (2).ext", ... (an endless supply)."""
    base, dot, ext = name.rpartition(".")
    if not base:                            # no extension, or ".ext" alone
        base, dot, ext = name, "", ""
    yield name
    number = 1
    while True:
        yield f"{base} ({number}){dot}{ext}"
        number += 1


# --- Unicode tables ----------------------------------------------------------
# Written by tools/unicode_tables.py from Unicode's own data (a subset, re-encoded;
# don't edit by hand):
# UTS #39 confusables.txt 14.0.0; Scripts.txt, ScriptExtensions.txt and
# DerivedCoreProperties.txt 15.0.0 (UCD). Data: Unicode, Inc., under
# the Unicode License (assets/THIRD-PARTY-NOTICES.txt). Read by _unicode_tables().
UNICODE_DATA = "confusables 14.0.0, scripts 15.0.0, Python 14.0.0"
# prototype=source,source,... (hex code points; a prototype of several joined by +)
_CONFUSABLE_TABLE = (
    "1002+102C=1000 1002+103E=1081 1003+103E=1070 1015+102C=101F 1015+102C+103E=106F "
    "1015+103E=1066 101E+103C=1029 101E+103C+1031+102C+103A=102A 102A8=A69A 10382=103D1 "
    "10393=103D3 1039A=12038 1041=1065 10412=A79A 1043A=A79B 10486=104A0 107D+103E=107E "
    "1099E=132F9 10C82=10CFC 10CA5=10CFA 1100=11A8 1100+1100=1101,11A9 1100+1102=11FA "
    "1100+1103=115A 1100+1105=11C3 1100+1107=11FB 1100+1109=11AA 1100+1109+1100=11C4 "
    "1100+110E=11FC 1100+110F=11FD 1100+1112=11FE 1102=11AB 1102+1100=1113,11C5 "
    "1102+1102=1114,11FF 1102+1103=1115,11C6 1102+1105=D7CB 1102+1107=1116 1102+1109=115B,11C7 "
    "1102+110C=115C,11AC 1102+110E=D7CC 1102+1110=11C9 1102+1112=115D,11AD 1102+1140=11C8 "
    "1103=11AE 1103+1100=1117,11CA 1103+1103=1104,D7CD 1103+1103+1107=D7CE 1103+1105=115E,11CB "
    "1103+1106=A960 1103+1107=A961,D7CF 1103+1109=A962,D7D0 1103+1109+1100=D7D1 "
    "1103+110C=A963,D7D2 1103+110E=D7D3 1103+1110=D7D4 1105=11AF 1105+1100=11B0,A964 "
    "1105+1100+1100=A965,D7D5 1105+1100+1109=11CC 1105+1100+1112=D7D6 1105+1102=1118,11CD "
    "1105+1103=11CE,A966 1105+1103+1103=A967 1105+1103+1112=11CF 1105+1105=1119,11D0 "
    "1105+1105+110F=D7D7 1105+1106=11B1,A968 1105+1106+1100=11D1 1105+1106+1109=11D2 "
    "1105+1106+1112=D7D8 1105+1107=11B2,A969 1105+1107+1103=D7D9 1105+1107+1107=A96A "
    "1105+1107+1109=11D3 1105+1107+110B=11D5,A96B 1105+1107+1111=D7DA 1105+1107+1112=11D4 "
    "1105+1109=11B3,A96C 1105+1109+1109=11D6 1105+110B=111B,D7DD 1105+110C=A96D "
    "1105+110F=11D8,A96E 1105+1110=11B4 1105+1111=11B5 1105+1112=111A,113B,11B6,D7F2 "
    "1105+1140=11D7 1105+114C=D7DB 1105+1159=11D9 1105+1159+1112=D7DC 1106=11B7 "
    "1106+1100=11DA,A96F 1106+1102=D7DE 1106+1102+1102=D7DF 1106+1103=A970 1106+1105=11DB "
    "1106+1106=D7E0 1106+1107=111C,11DC 1106+1107+1109=D7E1 1106+1109=11DD,A971 "
    "1106+1109+1109=11DE 1106+110B=111D,11E2 1106+110C=D7E2 1106+110E=11E0 1106+1112=11E1 "
    "1106+1140=11DF 1107=11B8 1107+1100=111E 1107+1102=111F 1107+1103=1120,D7E3 1107+1105=11E3 "
    "1107+1105+1111=D7E4 1107+1106=D7E5 1107+1107=1108,D7E6 1107+1107+110B=112C "
    "1107+1109=1121,11B9 1107+1109+1100=1122 1107+1109+1103=1123,D7E7 1107+1109+1107=1124 "
    "1107+1109+1109=1125 1107+1109+110C=1126 1107+1109+1110=A972 1107+110B=112B,11E6 "
    "1107+110C=1127,D7E8 1107+110E=1128,D7E9 1107+110F=A973 1107+1110=1129 1107+1111=112A,11E4 "
    "1107+1112=11E5,A974 1109=11BA 1109+1100=112D,11E7 1109+1102=112E 1109+1103=112F,11E8 "
    "1109+1105=1130,11E9 1109+1106=1131,D7EA 1109+1107=1132,11EA 1109+1107+1100=1133 "
    "1109+1107+110B=D7EB 1109+1109=110A,11BB 1109+1109+1100=D7EC 1109+1109+1103=D7ED "
    "1109+1109+1107=A975 1109+1109+1109=1134 1109+110B=1135 1109+110C=1136,D7EF "
    "1109+110E=1137,D7F0 1109+110F=1138 1109+1110=1139,D7F1 1109+1111=113A 1109+1140=D7EE "
    "110B=11BC 110B+1100=1141,11EC 110B+1100+1100=11ED 110B+1103=1142 110B+1105=A976 "
    "110B+1106=1143 110B+1107=1144 110B+1109=1145,11F1 110B+110B=1147,11EE 110B+110C=1148 "
    "110B+110E=1149 110B+110F=11EF 110B+1110=114A 110B+1111=114B 110B+1112=A977 "
    "110B+1140=1146,11F2 110C=11BD 110C+1107=D7F7 110C+1107+1107=D7F8 110C+110B=114D "
    "110C+110C=110D,D7F9 110C+110C+1112=A978 110E=11BE 110E+110F=1152 110E+1112=1153 110F=11BF "
    "1110=11C0 1110+1110=A979 1111=11C1 1111+1107=1156,11F3 1111+1109=D7FA 1111+110B=1157,11F4 "
    "1111+1110=D7FB 1111+1112=A97A 1112=11C2 1112+1102=11F5 1112+1105=11F6 1112+1106=11F7 "
    "1112+1107=11F8 1112+1109=A97B 1112+1112=1158 113C+113C=113D 113E+113E=113F 1140=11EB "
    "1140+1107=D7F3 1140+1107+110B=D7F4 11434+11442+11412=11413 11434+11442+11418=11419 "
    "11434+11442+11423=11424 11434+11442+11429=1142A 11434+11442+1142C=1142D "
    "11434+11442+1142E=1142F 114C=11F0 114C+1106=D7F5 114C+1112=D7F6 114E+114E=114F "
    "1150+1150=1151 11582=115D8,115D9 11583=115DA 11584=115DB 1159=11F9 1159+1159=A97C "
    "115B2=115DC 115B3=115DD 1161+1169=1176 1161+116E=1177 1161+30FC=11A3 1161+4E28=1162 "
    "1163+1169=1178 1163+116D=1179 1163+116E=11A4 1163+4E28=1164 1165+1169=117A 1165+116E=117B "
    "1165+30FC=117C 1165+4E28=1166 1167+1163=11A5 1167+1169=117D 1167+116E=117E 1167+4E28=1168 "
    "1169+1161=116A 1169+1161+4E28=116B 1169+1163=11A6 1169+1163+4E28=11A7 1169+1165=117F "
    "1169+1165+4E28=1180 1169+1167=D7B0 1169+1167+4E28=1181 1169+1169=1182 1169+1169+4E28=D7B1 "
    "1169+116E=1183 1169+4E28=116C 116D+1161=D7B2 116D+1161+4E28=D7B3 116D+1163=1184,1186 "
    "116D+1163+4E28=1185 116D+1165=D7B4 116D+1169=1187 116D+4E28=1188 116E+1161=1189 "
    "116E+1161+4E28=118A 116E+1165=116F 116E+1165+30FC=118B 116E+1165+4E28=1170 116E+1167=D7B5 "
    "116E+1167+4E28=118C 116E+116E=118D 116E+4E28=1171 116E+4E28+4E28=D7B6 1172+1161=118E "
    "1172+1161+4E28=D7B7 1172+1165=118F 1172+1165+4E28=1190 1172+1167=1191 1172+1167+4E28=1192 "
    "1172+1169=D7B8 1172+116E=1193 1172+4E28=1194 119E+1161=D7C5 119E+1165=119F "
    "119E+1165+4E28=D7C6 119E+116E=11A0 119E+119E=11A2 119E+4E28=11A1 11AE5+11AE5=11AE8 "
    "11AE5+11AE5+11AEF=11AE9 11AE5+11AE5+11AF0=11AEA 11AE5+11AEF=11AE6 11AE5+11AF0=11AE7 "
    "11AEB+11AEB=11AED 11AEB+11AEB+11AEF=11AEE 11AEB+11AEF=11AEC 11AF3+11AEF=11AF4 "
    "11AF3+11AF0=11AF5 11AF3+11AF3=11AF6 11AF3+11AF3+11AEF=11AF7 11AF3+11AF3+11AF0=11AF8 "
    "11CAA=11CB2 1206=544 1261=54C 12AE=53B 1323=54A 138=3BA,43A,1D0B,2C95,ABB6 138+329=49B "
    "138+335=49F 1401+1420=142B 1401+B7=140D 1404+B7=1411 1405+1420=142D 1405+B7=1413 "
    "1406+B7=1415 140A+1420=142E 140A+B7=1418 140B+B7=141A 141E+18DF=18DD 1421=14D1 1429=1540 "
    "1432+B7=143F 1434+B7=1443 1439+B7=1447 144F+B7=145C 1450+27=1469 1450+B7=145E 1451+B7=1460 "
    "1455+27=146A 1455+B7=1462 1456+B7=1464 146B+27=1485 146B+B7=1475 146E+B7=1479 1470+B7=147D "
    "1489=1603 1489+B7=1493 148B+B7=1495 148C+B7=1497 148E+B7=149B 1490=1602 1490+B7=149D "
    "1491+B7=149F 14A3+B7=14AD 14A6+B7=14B1 14A7+B7=14B3 14A8+B7=14B5 14AB+B7=14B9 14C0+B7=14CA "
    "14C2+B7=18C7 14C3+B7=18C9 14C4+B7=18CB 14C5+B7=18CD 14C7+B7=14CC 14C8+B7=14CE 14D3=1604 "
    "14D3+B7=14DD 14D5+B7=14DF 14D6+B7=14E1 14D7+B7=14E3 14D8+B7=14E5 14DA=1607 14DA+B7=14E7 "
    "14DB+B7=14E9 14ED+B7=14F7 14EF+B7=14F9 14F0+B7=14FB 14F1+B7=14FD 14F2+B7=14FF 14F4+B7=1501 "
    "14F5+B7=1503 150B+1455=150D 150B+1490=150F 150B+3C=150C 150B+62=150E 1510+B7=1518 "
    "1511+B7=151A 1512+B7=151C 1513+B7=151E 1514+B7=1520 1515+B7=1522 1516+B7=1524 1528+B7=1532 "
    "1529+B7=1534 152A+B7=1536 152B+B7=1538 152D+B7=153A 152E+B7=153C 1543=1622 1543+B7=18E0 "
    "1546=1623 154A=1624 154C+B7=154F 1550+146B=166F 1550+146C=157E 1550+146E=1580 1550+1470=1582 "
    "1550+1483=1585 1550+50=157F 1550+62=1583 1550+62+307=1584 1550+64=1581 155A+B7=155C "
    "155E+B7=18E3 1566+B7=18E4 1567+B7=1569 156B+B7=18E5 1586+B7=18E8 1595+1489=1670 "
    "1595+148A=158E 1595+148B=158F 1595+148C=1590 1595+148E=1592 1595+1490=1593 1595+1491=1594 "
    "1595+4A=1591 1596+148B=1671 1596+148C=1672 1596+148E=1674 1596+1490=1675 1596+1491=1676 "
    "1596+4A=1673 1597+B7=18EA 15A7+B7=1677 15A8+B7=1678 15A9+B7=1679 15AA+B7=167A 15AB+B7=167B "
    "15AC+B7=167C 15AD+B7=167D 15E1=A4F7 15F4+B7=18F0 161B+B7=18F2 1660=A4ED 16B9=A6B0 16BC=16E1 "
    "16BD=16C2 16DC=10294,118B7 16E6=104D0 16EF=2D63 17A2=17A3 1835=1855 185=44C,AB9F 185+69=44B "
    "185C=1896 186=3FD,2183,A4DB,10423 18DF+141E=18DC 18E=2D3A,A4F1 18F=4D8 18F5=18DB "
    "190=510,13CB,10401,16F2D 199E=19D0 19B1=19D1 1A45=1A80,1A90 1A8=3E9,1D24,A645 1A9=3A3,2D49 "
    "1AB=13BF 1B0D=1B52 1B1=162E,1634 1B11=1B53 1B28=1B58 1D00=AB7A 1D05=AB70 1D07=AB7C 1D0A=AB7B "
    "1D0E=377,438,1044D 1D18=1D29,ABB2 1D19=44F 1D1B=3C4,442,AB72 1D1B+329=4AD 1DD=259,4D9 "
    "1DD+2DE=25A 1DD+6F=1D14 1DD+6F+335=AB42 1DD+6F+338=AB41 1DDF=2DE8 1E9F=3B4,56E,1577 1F6=50A "
    "20E9=A66F 21=1C3,2D51 2132=15B5,A4DE 21D=292,4E1,10F3,2CCD,A76B 2202=1E8CC 2202+335=F0,1E8CD "
    "2207=118A8 2220=1E8C8 237=575 242=AB7E "
    "245=39B,41B,668,6F8,1431,2D37,A4E5,A6CE,1028D,104B0,16F3D 245+326=4C5 245+B7=143D 24B=1D90 "
    "254=37B,1D10,2184,1044B 254+338=AB3F 254+65=AB62 25C=437,1D08 25C+326=499 25E=10442 26=A778 "
    "262=50D,13FB,AB90 27=2B9,2BB,2BC,2BD,2BE,2C8,2CA,2CB,5D9,7F4,7F5,144A,16CC,A78C,16F51,16F52 "
    "27+27=2BA,2EE,5F2 27+42=181 27+44=18A 27+50=1A4 27+54=1AC 27+59=1B3 270=57A,1223 "
    "276C=304F,21FE8 277=1043F 278=3C6,444,2CAB 27E+334=1D73 280=AB71,ABA2 283=AB4D 28A+335=1D7F "
    "28C=1D27,104D8 28D=43C,1D0D,AB87 28D+326=4CE 298=2D59,A668,104C3 299=432,13FC 29A=A79D,1042A "
    "29C=43D,AB8B 29C+326=4C8,4CA 29C+329=4A3 29F=2CD1,ABAE,10443 2A=1031F 2A1=A6CD 2B=1029B "
    "2C=A4F9 2C3F=A992 2C6F=15C4,A4EF 2C70=1041F 2C75=370,13A8,13B0,A6B1 2C76=AB80 2C9+62=44A "
    "2C9+62+69=A651 2D=2CBA 2D40=102B8 2DEC=1DEE 2E=660,6F0,A4F8,1D16D 2E+2C=A4FB 2E+2E=A4FA "
    "2F=2CC6,3033,30CE,4E3F 300=953 301=59C,59D,618,64E,747,954 302=311,65B,7EE,1CD0,A6F0 "
    "303=342,653 304=305,659,7EB,1CD2,A6F1 306=30C,36E,658,65A,A67C "
    "306+307=310,6E8,901,981,A81,B01,C00,C81,D01,114BF "
    "307=358,5B9,5BA,5C1,5C2,5C4,6EC,740,741,7ED,8EA,902,A02,A82,BCD 3078=30D8 308=7F3,8EB "
    "309=302C 30A=366,5AF,652,6DF,B82,E4D,ECD,1036,17C6,17D3,2DEA,309A,11300 30B=64B,8F0 30E=1CDA "
    "30FC=1173,4E00,A7F7 30FC+1161=D7B9 30FC+1165=D7BA 30FC+1165+4E28=D7BB 30FC+1169=D7BC "
    "30FC+116E=1195 30FC+30FC=1196 30FC+4E28=1174 30FC+4E28+116E=1197 312=657 313=315,619,64F,8F3 "
    "314=65D 316=1CED 32=1A7,3E8,14BF,A644,A6EF,A75A 32+335=1BB "
    "323=5B4,5C5,65C,8ED,93C,9BC,A3C,ABC,B3C,1CDD,10A3A,111CA,114C3 324=8EE,1CDE 325=F37,302D "
    "326=321,327,339 328=322,345,1AB7 329=656,1CDC 32B=1CD5 32D=1CD9 32E=1CD8 "
    "33=1B7,21C,417,4E0,2CCC,A76A,A7AB,118CA,16F3B 33+326=498 331=320,952 333=347 335=336 338=337 "
    "34=13CE,118AF 34+B7=1530 35=1BC,118BB 350=357,8F8,8FF 352=900 354=8F9 355=8FA 3588=439B "
    "36=431,13EE,2CD2,118D5 363=2DF6 363D=39B3 364=2DF7 368=2DED 36F=2DEF 37=104D2,118C6 "
    "38=222,223,9EA,A6A,B03,1031A,1E8CB 39=9ED,A67,B68,D6D,2CCA,A76E,118AC,118CC,118D6 "
    "393=413,13B1,14A5,2C84,16F07 393+27=490 393+335=492 393+B7=14AF "
    "394=1403,2C86,2D60,10285,102A3,16F1A 394+1420=142C 394+B7=140F 3A=2D0,903,A83,A4FD "
    "3A0=41F,2CA0,A6DB 3A41=6409 3A6=424,553,1240,16F0,2CAA,102B3 3A8=470,16D8,2CAE,102B5,104D1 "
    "3A9=162F,1635,102B6 3ADA=66F6 3B35=80F6 3B3A=5E50 3B3B=4420 3BA3=69E9 3BB=2C96,104DB "
    "3C=1438,16B2 3C+B7=1445,2CB4 3C0=43F,1D28 3C2=3DB 3C7=2CAD,AB53,AB55 3C8=471,104F9 "
    "3C9=2CB1,A64D,A7B7 3D7=2CE4 3D8=102AD,10312 3E=1433,16F3F 3E+B7=1441 3EC=2CDC "
    "3F=241,294,97D,13AE,A6EB 4039=9FC3 403F=6663 40B=104CD 40D+326=48A "
    "41=391,410,13AA,15C5,A4EE,102A0,16F40 41+41=A732 41+45=C6,4D4 41+4F=A734 41+55=A736 "
    "41+56=A738,A73A 41+59=A73C 416+329=496 418=376,A6A1,10425 "
    "42=392,412,13F4,15F7,A4D0,A7B4,10282,102A1,10301 428=2CBC 42A+6C=A650 "
    "43=421,13DF,2CA4,A4DA,102A2,10302,10415,1051C,118E9,118F2 43+27=187 43+326=4AA 436+329=497 "
    "439+326=48B 43B=1D2B 43B+326=4C6 44=13A0,15DE,15EA,A4D3 44+335=D0,110,189 4443=6726 448=2CBD "
    "45=395,415,13AC,2D39,A4F0,10286,118A6,118AE 45+338=246 459=AB60 "
    "46=3DC,15B4,A4DD,A798,10287,102A5,10525,118A2,118C2 46+326=191 460=13C7,15EF 460+486+487=47C "
    "460+B7=18ED 46B6=8A1E 47=50C,13C0,13F3,A4D6 47+27=193 47+335=1E4 "
    "48=397,41D,13BB,157C,2C8E,A4E7,102CF 48+326=4C7,4C9 48+329=4A2,2C67 48+335=126 "
    "4A=37F,408,13AB,148D,A4D9,A7B2 4A+335=248 4A+B7=1499 4B=39A,41A,13E6,16D5,2C94,A4D7,10518 "
    "4B+27=198 4B+329=49A,2C69 4B+335=49E,A740 4B6=4CB 4B7=4CC 4BC+328=4BE "
    "4C=13DE,14AA,2CD0,A4E1,1041B,10526,118A3,118B2,16F16 4C+338=141 4C3=104BC "
    "4D=39C,3FA,41C,13B7,15F0,16D6,2C98,A4DF,102B0,10311 4D+326=4CD 4E=39D,2C9A,A4E0,10513 "
    "4E+326=19D 4E28=1175 4E28+1161=1198 4E28+1163=1199 4E28+1163+1169=D7BD 4E28+1163+4E28=D7BE "
    "4E28+1167=D7BF 4E28+1167+4E28=D7C0 4E28+1169=119A 4E28+1169+4E28=D7C1 4E28+116D=D7C2 "
    "4E28+116E=119B 4E28+1172=D7C3 4E28+119E=119D 4E28+30FC=119C 4E28+4E28=D7C4 4E8C=30CB "
    "4EBB=30A4 "
    "4F=30,39F,41E,555,7C0,9E6,B20,B66,12D0,2C9E,2D54,3007,A4F3,10292,102AB,10404,104C2,10516 "
    "4F=114D0,118B5,118E0 4F+27=13A4 4F+335=19F,398,3B8,472,4E8,13BE,13EB,2D31,A74A "
    "4F+338=D8,2D41 4F+45=152 4F+4F=A698,A74E 4F75=5002 50=3A1,420,13E2,146D,2CA2,A4D1,10295 "
    "50+27=1486 5024=503C 51=2D55 516B=30CF 52=1A6,13A1,13D2,1587,A4E3,104B4,16F35 529B=30AB "
    "53=405,54F,13D5,13DA,A4E2,10296,10420,16F3A 535C=30C8 53E3=30ED,56D7 "
    "54=3A4,422,13A2,2CA6,A4D4,10297,102B1,10315,118BC,16F0A 54+328=1AE 54+329=4AC 54+33=A728 "
    "54+335=166 54+338=23E 548=1260,144E,A4F5 548+27=1468 548+B7=145A "
    "55=54D,1200,144C,A4F4,104CE,118B8,16F42 55+27=1467 55+335=244,13CC 55+B7=1458 5553=555F "
    "559=2BF 56=474,667,6F7,13D9,142F,2D38,A4E6,A6DF,1051D,118A0,16F08 56+B7=143B "
    "57=51C,13B3,13D4,A4EA,118E6,118EF 571=1294 571F=58EB "
    "58=3A7,425,16B7,2CAC,2D5D,A4EB,A7B3,10290,102B4,10317,10322,10527,118EC 58+329=4B2 5861=586B "
    "58AB=58FF 59=3A5,423,4AE,13A9,13BD,2CA8,A4EC,102B2,118A4,16F43 59+335=24E,4B0 5915=30BF "
    "596=5AD 598=5AE 599=5A8 59A=5A4 5A=396,13C3,A4DC,102F5,118A9,118E5 5A+326=224 5A+335=1B5 "
    "5AAF=5B00 5C=4E36 5DE5=30A8 5E=2C6 5E21=5E32 5F=7FA 61=251,3B1,430 61+61=A733 61+65=E6,4D5 "
    "61+6F=A735 61+75=A737 61+76=A739,A73B 61+79=A73D 62=184,42C,13CF,1472,15AF 62+27=1488 "
    "62+304=182,183,411 62+307=1473 62+307+B7=1481 62+314=253 62+335=180,462,463,48C,48D "
    "62+6C=42B 62+B7=147F 6236=6238 628+654=8A1 628+6DB=751 628+6E2=8B6 629=6C3 62D+654=681,772 "
    "62D+6DB=685 62F=102E1 62F+302=6EE 62F+324+323=8AE 62F+615=688 62F+6DB=68E "
    "63=441,1D04,2CA5,ABAF,1043D 63+326=4AB 63+338=23C 631+302=6EF 631+306=692 631+306+307=8B9 "
    "631+615=691 631+654=76C 631+6DB=698 632+302=8B2 633+302=77E 633+6DB=634 635=102F2 "
    "635+324+323=8AF 635+6DB=69E 637=102E8 637+6DB=69F 64=501,13E7,146F,A4D2 64+21D=2A4 "
    "64+27=1487 64+291=2A5 64+304=18C 64+314=257 64+328=256 64+335=111 64+7A=2A3 64+B7=147B "
    "641=6A7 643=6A9,6AA 643+6DB=6AD,763 644+306=6B5 644+6DB=6B7 645+6DB=8A7 646+306=769 "
    "646+615=768 648=8B1,102E4 648+302=6C9 648+306=6C6 648+313=6C7 648+670=6C8 648+6DB=6CB "
    "649=64A,66E,6BA,6CC,6D2,8BD 649+302=63D 649+306=6CE,756 649+306+307=8BA 649+615=679,6BB "
    "649+654=8A8 649+6DB=62B,63F,67E,6BD,6D1 649+6DB+6E2=8B7 64C=8E5,8E8,8F1 64D=8F2 "
    "65=435,4BD,AB32 65+328=4BF 65+338=247 650=317,61A 655=65F 66=584,1E9D,A799,AB35 66+14B=2A9 "
    "66+326=192 66+334=1D6E 662=6F2,A9CF 663=6F3,1E8C9 664=6F4 665A=6669 666=6F6 "
    "669=6F9,967,118E4 67=18D,261,581,1D83 67+314=260 67+335=1E5 670=30D 670C=80A6 670F=80D0 "
    "6710=80CA 6713=8101 6718=8127 6723=81A7 676E=67FF 67B=6D0 68=4BB,570,13C2 "
    "68+314=266,13F2,A695 68+335=127,45B 68A+615=68B "
    "69=131,269,26A,3B9,456,4CF,13A5,A647,AB75,118C3 69+335=268,1D7B,1D7C 697+615=771 699D=6A27 "
    "6A=3F3,458 6A+335=249 6A1=66F,8BB,8BC 6A1+6DB=6A4,6A8 6A2+6DB=8A4 6AC=762 6AF=8B0 "
    "6AF+6DB=6B4 6B+314=199 "
    "6C=31,49,196,1C0,399,406,4C0,5D5,5DF,627,661,6F1,7CA,16C1,2C92,2D4F,A4F2,1028A,10309,10320 "
    "6C=16F28,1E8C7 6C+21D=26E 6C+27=5F1 6C+328=26D 6C+334=26B 6C+335=197,19A 6C+338=142 "
    "6C+4F=42E 6C+655=673 6C+674=672 6C+6C=1C1,5F0 6C+73=2AA 6C+7A=2AB 6C+B7=14B7 6DB=1AB4,20DB "
    "6E=578,57C 6E+328=273 6E+329=19E,3B7 6E+334=1D70 6E88=6F59 "
    "6F=3BF,3C3,43E,585,5E1,647,665,6BE,6C1,6D5,6F5,966,A66,AE6,BE6,C02,C66,C82,CE6,D02,D20,D66 "
    "6F=D82,E50,ED0,101D,1040,10FF,1D0F,1D11,2C9F,AB3D,1042C,104EA,118C8,118D7 6F+102C=1010 "
    "6F+1D07=276 6F+302=6FF 6F+31B=AB74 6F+335=275,473,4E9,A74B,AB8E,ABBB 6F+338=F8,AB3E "
    "6F+65=153 6F+6F=A699,A74F 6F+D30+6F=D5F 70=3C1,440,2CA3 70+314=1A5 70+335=1D7D 70+B7=1477 "
    "71=51B,563,566 71+314=2A0 72=433,1D26,2C85,AB47,AB48,AB81 72+27=491 72+328=27D 72+329=27C "
    "72+334=1D72 72+335=24D,493 72+6E=6D,11700,118E3 72+6E+326=271 72+6E+334=1D6F "
    "73=1BD,455,A731,ABAA,10448,118C1 73+328=282 73+334=1D74 73C=742 74+21D=A729 74+255=2A8 "
    "74+283=2A7 74+314=1AD 74+334=1D75 74+335=167 74+66=A777 74+73=2A6 "
    "75=28B,3C5,57D,1D1C,A79F,AB4E,AB52,104F6,118D8 75+335=1D7E,AB9C 75+65=1D6B 75+6F=AB63 "
    "754=767,8A9 76=3BD,475,5D8,1D20,ABA9,11706,118C0 "
    "77=26F,461,51D,561,1D21,AB83,1170A,1170E,1170F 77+307=114C5 77+326=A761 77+486+487=47D "
    "78=445,1541,157D 7814=784F 79=263,28F,3B3,443,4AF,10E7,1D8C,1EFF,AB5A,118DC 79+314=1B4 "
    "79+335=24F,4B1 7A=1D22,AB93,118C4 7A+326=225 7A+328=290 7A+334=1D76 7A+335=1B6 7D55=7D76 "
    "80FC=8141 848D=853F 8637=8641 8A2E=8A7D 8B86=8B8F 8C5C=8C63 8D7F=8D86 8DE5=8DFA 8E97=8E9B "
    "8EFF=8F27 905+93E=906 905+93E+946=912 905+93E+947=913 905+93E+948=914 905+946=904 "
    "905+949=911 90CE=90DE 90F+945=90D 90F+946=90E 90F+947=910 930+94D+907=908 93A=111CB "
    "93AD=93AE 93D=ABD 941=AC1 942=AC2 946=A4B 94D=A4D,ACD 964=A830 968=AE8 969=AE9 96A=AEA "
    "96B7=96B8 96E=AEE 971=D4E 983=A03,C03,C83,D03,D83,1038,114C1 985+9BE=986 98B+9C3=9E0,9E1 "
    "998=11492 99A=11494 99C=11496 99E=11498 99F=11499 9A1=1149B 9A3=114AA 9A4=1149E 9A5=1149F "
    "9A6=114A0 9A7=114A1 9A8=114A2 9AA=114A3 9AC=114A9 9AE=114A7 9AF=114A8 9B0=114AB 9B2=1149D "
    "9B7=114AD 9B8=114AE 9BD=114C4 9BE=114B0 9BF=114B1 9C7=114B9 9CD=114C2 9D7=114BD 9E42=9E43 "
    "9E7=114D1 9E8=114D2 9EC=114D6 9ED1=9ED2 A05+A3E=A06 A05+A48=A10 A05+A4C=A14 A4D5=A7B1 "
    "A4E4=A79E A4F6=10411,16F26 A64C=A7B6 A658=16F1C A669=104EB A72+A3F=A07 A72+A40=A08 "
    "A72+A47=A0F A727=A795 A73+A41=A09 A73+A42=A0A A73E=3FF A73F=37D A779=A77A A786=10A0 "
    "A792=404,2C88 A793=25B,3B5,454,511,2C89,AB9B,10429,118CE A7FB=15B7 A85+ABE=A86 "
    "A85+ABE+AC5=A91 A85+ABE+AC7=A93 A85+ABE+AC8=A94 A85+AC5=A8D A85+AC7=A8F A85+AC8=A90 "
    "A8FB=111DC A99D=A9A3 AA01=AA53 AA23=AA56 B05+B3E=B06 B7=1427,A78F B7+1401=140C B7+1404=1410 "
    "B7+1405=1412 B7+1406=1414 B7+140A=1417 B7+140B=1419 B7+1432=143E B7+1434=1442 B7+1439=1446 "
    "B7+144F=145B B7+1450=1454,145D B7+1451=145F B7+1455=1461 B7+1456=1463 B7+146B=1474 "
    "B7+146E=1478 B7+1470=147C B7+1489=1492 B7+148B=1494 B7+148C=1496 B7+148E=149A B7+1490=149C "
    "B7+1491=149E B7+14A3=14AC B7+14A6=14B0 B7+14A7=14B2 B7+14A8=14B4 B7+14AB=14B8 B7+14C0=14C9 "
    "B7+14C2=18C6 B7+14C3=18C8 B7+14C4=18CA B7+14C5=18CC B7+14C7=14CB B7+14C8=14CD B7+14D3=14DC "
    "B7+14D5=14DE B7+14D6=14E0 B7+14D7=14E2 B7+14D8=14E4 B7+14DA=14E6 B7+14DB=14E8 B7+14ED=14F6 "
    "B7+14EF=14F8 B7+14F0=14FA B7+14F1=14FC B7+14F2=14FE B7+14F4=1500 B7+14F5=1502 B7+1510=1517 "
    "B7+1511=1519 B7+1512=151B B7+1513=151D B7+1514=151F B7+1515=1521 B7+1516=1523 B7+1528=1531 "
    "B7+1529=1533 B7+152A=1535 B7+152B=1537 B7+152D=1539 B7+152E=153B B7+1543=18CE B7+1546=18CF "
    "B7+1547=18D0 B7+1548=18D1 B7+1549=18D2 B7+154B=18D3 B7+154C=154E B7+155A=155B B7+1567=1568 "
    "B7+18B1=18B3 B7+18B4=18B6 B7+18B8=18B9 B7+18C0=18C2 B7+245=143C B7+34=152F B7+393=14AE "
    "B7+394=140E B7+3C=1444 B7+3E=1437,1440 B7+4A=1498 B7+4C=14B6 B7+50=1476 B7+548=1459 "
    "B7+55=1457 B7+56=143A B7+62=147E B7+62+307=1480 B7+64=147A B7+B7+B7=2D48 B85=BEE B88=BB0,BBE "
    "B88+BC1=BEB B89=BE8,D09 B89+BB3=B8A B89+D57=D0A B8E=BED B90=B9C,D1C B95=BE7 B9A=BEA "
    "B9A+BC1=BEC B9A+BC2=BF2 B9F+BBF=D3A BA3=D23 BA9=BC8 BAF=BF0 BB3=BD7 BB4=D34 BB6=D36 "
    "BBF=D3F,D40 C05=C85 C06=C86 C07=C87 C0B+C3E=C60 C0C+C3E=C61 C12=C92 C12+C4C=C14,C94 "
    "C12+C55=C13,C93 C1C=C9C C1E=C9E C21+323=C22 C23=CA3 C27+5BC=C25 C2C+323=C2D C2F=CAF "
    "C30+5BC=C20 C31=CB1 C32=CB2 C35+323=C37 C35+C3E=C39 C35+C41=C2E C41+C3E=C42 C43+C3E=C44 "
    "C67=CE7 C68=CE8 C6F=CEF C8C+CBE=CE1 D07+D57=D08 D0E+D46=D10 D12+D3E=D13 D12+D57=D14 D1E=D61 "
    "D26+D4D+D30=D6B D28+D41=D0C,D19 D28+D4D=D6F,D7B D28+D4D+D28=D6C D28+D4D+D2E=D5A D30=D31 "
    "D30+D4D=D6A,D7C D35+D4D+D30=D6E D39+D4D+D2E=D76 D41=D42,D43 D46+D46=D48 DA2=DEA DAF=DEB "
    "DE=3F7,104C4 DE8+DCF=DE9 DE8+DD3=DEF DF=3B2,13F0,A7B5 E02=E03 E04=E14,E15 E06=E21 E08=E88 "
    "E0A=E0B E0E=E0F E11=E17 E1A=E9A E1B=E9B E1D=E9D E1E=E9E E1F=E9F E20=E26 E22=E8D E32=E45 "
    "E34=17B7 E35=17B8 E36=17B9 E37=17BA E38=EB8 E39=EB9 E40+E40=E41 E48=EC8,17CB E49=EC9 E4A=ECA "
    "E4B=ECB F62=F6A F68+F7C+F7E=F00 FE=1BF,3F8"
)
# script(+script...)=range,range,... (Script_Extensions of letters, marks and digits)
_SCRIPT_TABLE = (
    "Adlm=1E900-1E959 Adlm+Arab+Mand+Mani+Ougr+Phlp+Rohg+Sogd+Syrc=640 Aghb=10530-10563 "
    "Ahom=11700-11746 "
    "Arab=610-63F,641-64A,656-65F,66E-66F,671-6FF,750-77F,870-8FF,FB50-FDF1,FDF3-FDFB,FE70-FEFC "
    "Arab=1EE00-1EEBB Arab+Copt=102E0 Arab+Syrc=64B-655,670 Arab+Thaa=FDF2 Arab+Thaa+Yezi=660-669 "
    "Armi=10840-10855 Armn=531-588,FB13-FB17 Avst=10B00-10B35 Bali=1B00-1B73 "
    "Bamu=A6A0-A6F1,16800-16A38 Bass=16AD0-16AF4 Batk=1BC0-1BF3 Beng=980-9E3,9F0-9FE,1CF7 "
    "Beng+Cakm+Sylo=9E6-9EF Beng+Deva=1CD5-1CD6,1CD8,1CE1,1CEA,1CED,1CF5-1CF6,A8F1 "
    "Beng+Deva+Gran+Gujr+Guru+Knda+Latn+Mlym+Orya+Shrd+Taml+Telu+Tirh=951 "
    "Beng+Deva+Gran+Gujr+Guru+Knda+Latn+Mlym+Orya+Taml+Telu+Tirh=952 "
    "Beng+Deva+Gran+Knda=1CD0,1CD2 Beng+Deva+Gran+Knda+Nand+Orya+Telu+Tirh=1CF2 Bhks=11C00-11C59 "
    "Bopo=3105-312F,31A0-31BF Bopo+Hani=302A-302D Brah=11000-1107F Bugi=1A00-1A1B Bugi+Java=A9CF "
    "Buhd=1740-1753 Cakm=11100-11147 Cakm+Mymr+Tale=1040-1049 "
    "Cans=1401-167F,18B0-18F5,11AB0-11ABF Cari=102A0-102D0 Cham=AA00-AA59 "
    "Cher=13A0-13FD,AB70-ABBF Chrs=10FB0-10FC4 Copt=3E2-3EF,2C80-2CF3 Cpmn=12F90-12FF0 "
    "Cprt=10800-1083F "
    "Cyrl=400-481,488-52F,1C80-1C88,1D2B,1D78,2DE0-2DFF,A640-A66E,A670-A69F,FE2E-FE2F "
    "Cyrl+Glag=484,487,A66F Cyrl+Latn=485-486 Cyrl+Perm=483 Cyrl+Syrc=1DF8 "
    "Deva=900-950,955-963,971-97F,1CD1,1CD4,1CDB,1CDE-1CDF,1CE2-1CE8,1CEB-1CEC,1CEE-1CF1 "
    "Deva=A8E0-A8F0,A8F2,A8F4-A8FF Deva+Dogr+Kthi+Mahj=966-96F Deva+Gran=1CF3,1CF8-1CF9 "
    "Deva+Gran+Knda=1CF4 Deva+Gran+Latn=20F0 Deva+Knda+Mlym+Orya+Taml+Telu=1CDA Deva+Nand=1CE9 "
    "Deva+Shrd=1CD7,1CD9,1CDC-1CDD,1CE0 Deva+Taml=A8F3 Diak=11900-11959 Dogr=11800-1183A "
    "Dsrt=10400-1044F Dupl=1BC00-1BC9E Egyp=13000-1342E Elba=10500-10527 Elym=10FE0-10FF6 "
    "Ethi=1200-138F,2D80-2DDE,AB01-AB2E,1E7E0-1E7FE Geor=10A0-10FF,1C90-1CBF,2D00-2D2D "
    "Glag=2C00-2C5F,1E000-1E02A Gong=11D60-11DA9 Gonm=11D00-11D59 Goth=10330-10349 "
    "Gran=11300,11302,11305-11339,1133D-11374 Gran+Taml=BE6-BEF,11301,11303,1133B-1133C "
    "Grek=342,345,370-373,376-3E1,3F0-3FF,1D26-1D2A,1D5D-1D61,1D66-1D6A,1DBF-1DC1,1F00-1FFC,2126 "
    "Grek=AB65,1D242-1D244 Gujr=A81-AE3,AF9-AFF Gujr+Khoj=AE6-AEF Guru=A01-A5E,A70-A75 "
    "Guru+Mult=A66-A6F Hang=1100-11FF,302E-302F,3131-318E,A960-A97C,AC00-D7FB,FFA0-FFDC "
    "Hani=3005-3006,303B,3400-9FFF,F900-FAD9,16FE3,16FF0-16FF1,20000-3134A Hani+Hira+Kana=303C "
    "Hano=1720-1734 Hatr=108E0-108F5 Hebr=591-5F2,FB1D-FB4F "
    "Hira=3041-3096,309D-309F,1B001-1B11F,1B150-1B152 "
    "Hira+Kana=3031-3035,3099-309A,30FC,FF70,FF9E-FF9F Hluw=14400-14646 Hmng=16B00-16B8F "
    "Hmnp=1E100-1E14E Hung=10C80-10CF2 Ital=10300-1032F Java=A980-A9C0,A9D0-A9D9 Kali=A900-A92D "
    "Kana=30A1-30FA,30FD-30FF,31F0-31FF,FF66-FF6F,FF71-FF9D,1AFF0-1B000,1B120-1B122,1B164-1B167 "
    "Khar=10A00-10A3F Khmr=1780-17E9 Khoj=11200-1123E Kits=16FE4,18B00-18CD5 Knda=C80-CE3,CF1-CF2 "
    "Knda+Nand=CE6-CEF Kthi=11080-110C2 Lana=1A20-1AA7 Laoo=E81-EDF "
    "Latn=41-AA,BA-2B8,2E0-2E4,363-36F,1D00-1D25,1D2C-1D5C,1D62-1D65,1D6B-1D77,1D79-1DBE "
    "Latn=1E00-1EFF,2071-209C,212A-212B,2132,214E-2184,2C60-2C7F,A722-A787,A78B-A7FF,AB30-AB64 "
    "Latn=AB66-AB69,FB00-FB06,FF21-FF5A,10780-107BA,1DF00-1DF1E Lepc=1C00-1C4F Limb=1900-194F "
    "Lina=10600-10767 Linb=10000-100FA Lisu=A4D0-A4FD,11FB0 Lyci=10280-1029C Lydi=10920-10939 "
    "Mahj=11150-11176 Maka=11EE0-11EF6 Mand=840-85B Mani=10AC0-10AE6 Marc=11C72-11CB6 "
    "Medf=16E40-16E7F Mend=1E800-1E8D6 Merc=109A0-109BF Mero=10980-1099F Mlym=D00-D7F "
    "Modi=11600-11659 Mong=180B-18AA Mroo=16A40-16A69 Mtei=AAE0-AAF6,ABC0-ABF9 Mult=11280-112A8 "
    "Mymr=1000-103F,1050-109D,A9E0-A9FE,AA60-AA7F Nand=1CFA,119A0-119E4 Narb=10A80-10A9C "
    "Nbat=10880-1089E Newa=11400-11461 Nkoo=7C0-7FD Nshu=16FE1,1B170-1B2FB Ogam=1681-169A "
    "Olck=1C50-1C7D Orkh=10C00-10C48 Orya=B01-B71 Osge=104B0-104FB Osma=10480-104A9 "
    "Ougr=10F70-10F85 Palm=10860-10876 Pauc=11AC0-11AF8 Perm=10350-1037A Phag=A840-A873 "
    "Phli=10B60-10B72 Phlp=10B80-10B91 Phnx=10900-10915 Plrd=16F00-16F9F Prti=10B40-10B55 "
    "Rjng=A930-A953 Rohg=10D00-10D39 Runr=16A0-16F8 Samr=800-82D Sarb=10A60-10A7C Saur=A880-A8D9 "
    "Sgnw=1DA00-1DAAF Shaw=10450-1047F Shrd=11180-111DC Sidd=11580-115DD Sind=112B0-112F9 "
    "Sinh=D81-DF3 Sogd=10F30-10F50 Sogo=10F00-10F27 Sora=110D0-110F9 Soyo=11A50-11A9D "
    "Sund=1B80-1BBF Sylo=A800-A82C Syrc=710-74F,860-86A,1DFA Tagb=1760-1773 Takr=11680-116C9 "
    "Tale=1950-1974 Talu=1980-19D9 Taml=B82-BD7 Tang=16FE0,17000-18AFF,18D00-18D08 Tavt=AA80-AADD "
    "Telu=C00-C6F Tfng=2D30-2D7F Tglg=1700-171F Thaa=780-7B1 Thai=E01-E59 Tibt=F00-FC6 "
    "Tirh=11480-114D9 Tnsa=16A70-16AC9 Toto=1E290-1E2AE Ugar=10380-1039D Vaii=A500-A62B "
    "Vith=10570-105BC Wara=118A0-118FF Wcho=1E2C0-1E2F9 Xpeo=103A0-103CF Xsux=12000-12543 "
    "Yezi=10E80-10EB1 Yiii=A000-A48C Zanb=11A00-11A47 "
    "Zinh=300-341,343-344,346-362,953-954,1AB0-1ACE,1DC2-1DF7,1DF9,1DFB-1DFF,20D0-20EF,FE00-FE2D "
    "Zinh=101FD,1CF00-1CF46,1D167-1D169,1D17B-1D1AD,E0100-E01EF "
    "Zyyy=30-39,B5,2B9-2D1,2EC-2EE,374,2102-2124,2128,212C-2131,2133-2149,2E2F,A717-A71F,A788 "
    "Zyyy=FF10-FF19,1D165-1D166,1D16D-1D172,1D400-1D7FF,1FBF0-1FBF9"
)
# Default_Ignorable_Code_Point ranges
_IGNORABLE_TABLE = (
    "AD 34F 61C 115F-1160 17B4-17B5 180B-180D 180E 180F 200B-200F 202A-202E 2060-2064 2065 "
    "2066-206F 3164 FE00-FE0F FEFF FFA0 FFF0-FFF8 1BCA0-1BCA3 1D173-1D17A E0000 E0001 E0002-E001F "
    "E0020-E007F E0080-E00FF E0100-E01EF E01F0-E0FFF"
)

# =============================================================================
# 5. ROOMS: members, history, help and passwords, as pure rules
# =============================================================================
# Decides what goes to whom and returns it as data: a list of Deliveries,
# (member handle, Event). It never sends anything, never reads a clock (time
# arrives as `now`), and knows nothing of sockets, so the rules below are
# tested with plain calls. A member handle is any hashable the caller picks
# (the host uses its Seat objects); rooms never look inside it. Names and
# text are checked by the section above.
#
# The rules, also in README.md:
# - "A User ID is unique in its room" (and so is anything that looks like
#   it: NAMES AND TEXT's look_key).
# - "When the last member leaves, the room and all it knew about its members
#   is forgotten." Its password too.
# - "Whoever opens a room may give it a password; joining it then needs the
#   password (wrong_password). The host keeps only a salted scrypt hash, and
#   an address's next guess is heard only after a wait that doubles with
#   each wrong one (rate_limited until then)."
# - Flood control per member (FloodGate, in LIMITS AND DEFAULTS; README.md
#   "Limits"): a burst past the rate gets rate_limited line by line; a
#   flood, a disconnect.
# - "The host delivers a private line to its sender, as the confirmation,
#   and to that one member. No other connection carries it." It is never
#   room history; a resume gives it to those two alone (README.md "Private
#   messages").

Delivery = tuple[Any, Event]

HELP_TEMPLATE = """\
HELP
1. Text chat: type a line and press Enter (or Send). Everyone in this room
   sees it with your name and the time. Rooms are independent: nothing you
   say reaches another room.
   /msg USERID text sends a private line to that person alone (an ID with
   a space goes in quotes: /msg "li lei" hi); in the window, click them in
   the member list. Nobody else sees it, now or after joining later.
2. Video and voice calls:
   2.1 Type /CHECK USERID to call someone in this room; the host arranges
       the ports for you. Only the person you call is told "<you> CALL YOU".
   2.2 The call connects when they call you back within {call_timeout} (they
       type /CHECK with your ID); if they don't, the call fails and you are
       told they are busy. /decline USERID refuses a call at once.
   2.3 Or call an address directly, the host playing no part in the call:
       /call IP PORT1 PORT2 (in the window: type "ip port1 port2" and press
       Video call) receives on your UDP PORT1 and sends to their PORT2;
       they type the mirror.
       Both of you see a safety code: compare it by voice.
   2.4 Calling someone who is already in a call joins that call (up to
       {max_call_size} people, everyone sees and hears everyone).
   2.5 /hangup USERID ends your call with that person, /hangup ends all
       (in a video window: ESC on theirs, Backspace on your own). /mute,
       /unmute, /video off and /video on are for your own side.
3. Files: /send PATH sends a file to everyone in the room; /send PATH @USER
   sends it to that person only. Chat keeps flowing while files move.
   /cancel N stops file N either way; a big file that asks first (see
   --ask-above) waits for /accept N or /decline N.
4. System notices: entering and leaving the room, and incoming calls, are
   announced by [SYSTEM] lines. Only the host can send them: a user's text
   that starts with [SYSTEM] is still shown as that user's message, and
   nobody can be called SYSTEM.
5. Commands: /who lists the members, /quit leaves, help shows this text
   (to you alone)."""


def help_text(call_timeout_s: float = CALL_TIMEOUT_S, max_call_size: int = MAX_CALL_SIZE) -> str:
    """The host's answer to `help`, telling the truth about its own limits
    (--call-timeout, --max-call-size)."""
    if call_timeout_s >= 60 and call_timeout_s % 60 == 0:
        minutes = int(call_timeout_s // 60)
        timeout = "1 minute" if minutes == 1 else f"{minutes} minutes"
    else:
        timeout = "1 second" if call_timeout_s == 1 else f"{call_timeout_s:g} seconds"
    return HELP_TEMPLATE.format(call_timeout=timeout, max_call_size=max_call_size)


HELP_TEXT = help_text()     # with the default limits


# --- Room passwords ----------------------------------------------------------
# The password never stays: the host turns it into a Lock (a random salt and
# the scrypt key of the password with it) or checks it against the room's
# Lock, and drops it. scrypt is slow on purpose, about 50 ms and 16 MiB a
# call (README, "Room passwords"), so `password_key` is called on a thread,
# never on the host's loop; Rooms only compares the keys it is given.

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1
SCRYPT_MAXMEM = 64 * 1024 * 1024    # hashlib's default (32 MiB) is just too small
SALT_BYTES = 16
PASSWORD_FORGET_S = 600.0           # an address with no wrong guess this long starts afresh
MAX_GUESSERS = 4096                 # addresses remembered; the oldest go first


@dataclasses.dataclass(frozen=True)
class Lock:
    """A room password as a host keeps it: never the password itself."""
    salt: bytes
    key: bytes = dataclasses.field(repr=False)     # password_key(password, salt)


def password_key(password: str, salt: bytes) -> bytes:
    """scrypt of `password` (NFC, so a Mac's and a PC's typing agree) with
    `salt`. Slow on purpose: call it on a thread, never on an event loop."""
    return hashlib.scrypt(unicodedata.normalize("NFC", password).encode("utf-8", "replace"),
                          salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                          maxmem=SCRYPT_MAXMEM, dklen=32)


def guesser(address: str) -> str:
    """Whom a wrong guess counts against: an IPv4 address, or the /64 of an
    IPv6 one (a single machine may hold a whole /64)."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class Guesses:
    """Wrong room passwords per address (see `guesser`), and how long each
    must wait before its next guess is heard: `first_s` after one wrong
    guess, doubled for each further one in a row, at most `max_s`. An
    address with no wrong guess for `forget_s` starts afresh; a right
    password does not wipe the slate (it may be another room's). Time is
    the caller's clock, in seconds."""

    def __init__(self, first_s: float = PASSWORD_DELAY_S, max_s: float = PASSWORD_DELAY_MAX_S,
                 forget_s: float = PASSWORD_FORGET_S, max_addresses: int = MAX_GUESSERS) -> None:
        self.first_s = first_s
        self.max_s = max(max_s, first_s)
        self.forget_s = max(forget_s, self.max_s)
        self.max_addresses = max_addresses
        self._by: dict[str, tuple[int, float]] = {}  # address -> (wrong in a row, when last)

    def delay(self, wrong: int) -> float:
        """The wait after `wrong` wrong guesses in a row (0 for none)."""
        return 0.0 if wrong <= 0 else min(self.max_s, self.first_s * 2 ** min(wrong - 1, 64))

    def wait(self, address: str, now: float) -> float:
        """Seconds before `address` may guess again; 0: now."""
        wrong, last = self._by.get(address, (0, now))
        if now - last > self.forget_s:
            return 0.0
        return max(0.0, last + self.delay(wrong) - now)

    def wrong(self, address: str, now: float) -> float:
        """Count a wrong guess from `address`; returns the wait it earns."""
        wrong, last = self._by.pop(address, (0, now))
        if now - last > self.forget_s:
            wrong = 0
        self._by[address] = (wrong + 1, now)    # last in the dict: the newest
        for old in list(itertools.islice(self._by, max(0, len(self._by) - self.max_addresses))):
            del self._by[old]
        while self._by:                         # the oldest first: drop the forgotten
            first = next(iter(self._by))
            if now - self._by[first][1] <= self.forget_s:
                break
            del self._by[first]
        return self.delay(wrong + 1)

    def __len__(self) -> int:
        return len(self._by)


@dataclasses.dataclass
class Member:
    user: str                   # display form, as the person typed it (NFC)
    joined: float               # Unix time


@dataclasses.dataclass
class Room:
    """One room's state. Held only while the room has members."""
    name: str
    members: dict[Any, Member] = dataclasses.field(default_factory=dict)
    by_key: dict[str, Any] = dataclasses.field(default_factory=dict)  # id_key -> handle
    by_look: dict[str, Any] = dataclasses.field(default_factory=dict)  # look_key -> handle
    seq: int = 0                # last sequence number given to a room event
    history: collections.deque = dataclasses.field(default_factory=collections.deque)
    log: collections.deque = dataclasses.field(default_factory=collections.deque)
    log_bytes: int = 0          # text held in `log`
    lock: Lock | None = None    # set by whoever opened the room; None: open to all
    # (sender's id_key, message id) -> (seq, ts, to) of the newest SAID_IDS_KEPT
    # messages: a resend is confirmed from here, even after the log let it go.
    said: collections.OrderedDict = dataclasses.field(default_factory=collections.OrderedDict)
    # seq -> (sender, recipient) handles of each private line in `log`: a
    # resume gives it to those two alone. Handles, not IDs: an ID is taken
    # again by someone else once its owner leaves.
    private: dict[int, tuple[Any, Any]] = dataclasses.field(default_factory=dict)

    def user_list(self) -> tuple[str, ...]:
        return tuple(m.user for m in self.members.values())   # dicts keep join order


class Rooms:
    """Every room of one host, and who is in which.

    Each method returns the Deliveries it causes, or raises Refused for a
    request the caller must refuse (then nothing changed).
    """

    def __init__(self, *, host_name: str = "", history_limit: int = HISTORY_LIMIT,
                 max_message_bytes: int = MAX_MESSAGE_BYTES,
                 max_members: int = MAX_ROOM_MEMBERS, max_file_size: int = 0,
                 grace_s: float = 0, log_events: int = RESUME_LOG_EVENTS,
                 log_bytes: int = RESUME_LOG_BYTES, said_ids_kept: int = SAID_IDS_KEPT,
                 call_timeout_s: float = CALL_TIMEOUT_S,
                 max_call_size: int = MAX_CALL_SIZE) -> None:
        self.host_name = host_name
        self.said_ids_kept = said_ids_kept
        self.help = help_text(call_timeout_s, max_call_size)
        self.max_file_size = max_file_size
        self.grace_s = grace_s              # said in the welcome (the host holds seats)
        self.log_events = log_events
        self.log_bytes = log_bytes
        self.history_limit = history_limit
        self.max_message_bytes = max_message_bytes
        self.max_members = max_members
        self._rooms: dict[str, Room] = {}       # id_key(room) -> Room
        self._rooms_look: dict[str, Room] = {}  # look_key(room) -> Room
        self._where: dict[Any, Room] = {}       # member handle -> its room

    # --- queries ---

    def summary(self) -> list[tuple[str, int]]:
        """(room, member count) for every open room, largest first."""
        return sorted(((r.name, len(r.members)) for r in self._rooms.values()),
                      key=lambda pair: (-pair[1], id_key(pair[0])))

    def room_of(self, member: Any) -> Room | None:
        return self._where.get(member)

    def user_of(self, member: Any) -> str | None:
        room = self._where.get(member)
        return room.members[member].user if room else None

    def __len__(self) -> int:
        return len(self._rooms)

    def door(self, room_name: str, password: bool) -> Lock | None:
        """What a login to `room_name`, with a password or without, must
        match: the room's Lock (hash the password with its salt), or None
        (no room by that name yet: a password, if any, makes its Lock; or
        an open room and no password). Raises Refused: wrong_password (a
        protected room and no password), room_not_protected (an open room
        and a password: the person thinks it is private, and it is not).
        """
        room = self._room_named(room_name)
        if room is not None:
            _check_lock(room, password)
            return room.lock
        return None

    def locked(self, room_name: str) -> bool:
        """Whether `room_name` is open and protected by a password."""
        room = self._room_named(room_name)
        return room is not None and room.lock is not None

    def _room_named(self, room_name: str) -> Room | None:
        try:
            return self._rooms.get(id_key(check_id(room_name, "room")))
        except Refused:
            return None

    # --- commands ---

    def join(self, member: Any, room_name: str, user: str, now: float,
             resume: str = "", lock: Lock | None = None) -> list[Delivery]:
        """Put `member` into a room as `user`.

        `lock` is the joiner's password made into a Lock (None: no
        password): for a protected room, keyed with that room's salt (see
        `door`); for a room this join opens, its Lock to be.
        Delivers Welcome (with `resume`, the token the host keeps for this
        seat) and the room's history (oldest first, history=True) to the
        joiner, then an "enter" notice to everyone in the room.
        Raises Refused: bad_room_id, bad_user_id, wrong_password,
        room_not_protected, user_taken, room_full (a password is checked
        first: who is inside is not told to whoever can't come in).
        """
        if member in self._where:
            raise Refused("bad_frame", "already in a room")
        room_name = check_id(room_name, "room")
        user = check_id(user, "user")
        if imitates_system(user):
            raise Refused("bad_user_id", f"{user!r} is reserved for system notices")
        room = self._rooms.get(id_key(room_name)) or self._rooms_look.get(look_key(room_name))
        if room is not None:
            _check_lock(room, lock is not None, lock)
            if id_key(user) in room.by_key or look_key(user) in room.by_look:
                raise Refused("user_taken", f"{user!r} is already in room {room.name!r}"
                              " (or a name that looks like it)")
            if len(room.members) >= self.max_members:
                raise Refused("room_full", f"room {room.name!r} has "
                              f"{self.max_members} members, the most it takes")
        else:
            room = Room(room_name, history=collections.deque(maxlen=self.history_limit),
                        lock=lock)
            self._rooms[id_key(room_name)] = room
            self._rooms_look[look_key(room_name)] = room
        room.members[member] = Member(user, now)
        room.by_key[id_key(user)] = member
        room.by_look[look_key(user)] = member
        self._where[member] = room
        out: list[Delivery] = [(member, Welcome(PROTOCOL_VERSION, room.name, user,
                                                room.user_list(), self.host_name,
                                                self.max_file_size, resume,
                                                self.grace_s if resume else 0))]
        out += [(member, dataclasses.replace(m, history=True)) for m in room.history]
        out += self._notice(room, "enter", user, f"{user} entered the room", now)
        return out

    def say(self, member: Any, text: str, msg_id: str, now: float,
            to: str = "") -> list[Delivery]:
        """A member's chat line: to everyone in the room, the sender included
        (that copy is the host's confirmation). `help` in any letter case
        goes back to the sender alone as the help text. A refused text comes
        back to the sender as an Error naming `msg_id`.

        With `to`, a private line: "The host delivers a private line to its
        sender, as the confirmation, and to that one member. No other
        connection carries it." It is never room history, and a resume
        gives it to those two alone. Refused with no_such_user when nobody
        in the room has that ID, bad_message when it is the sender's own.
        """
        room = self._where[member]
        if not to and text.strip().casefold() == "help":
            return [(member, Help(self.help))]
        try:
            text = check_text(text, self.max_message_bytes)
        except Refused as refusal:
            return [(member, Error(refusal.code, refusal.message, msg_id))]
        sender = room.members[member].user
        earlier = room.said.get((id_key(sender), msg_id))
        if earlier is not None:             # a resend: confirmed again, never doubled
            seq, ts, was_to = earlier       # (its recipient may have left since)
            return [(member, Message(seq, msg_id, sender, text, ts, to=was_to))]
        target = None
        if to:
            target = room.by_key.get(id_key(to)) or room.by_look.get(look_key(to))
            if target is None:
                return [(member, Error("no_such_user", f"{printable(to)!r} is not in room "
                                       f"{room.name!r}; the message was not sent", msg_id))]
            if target == member:            # handles are any hashable (ROOMS' contract)
                return [(member, Error("bad_message", "a private message goes to someone "
                                       "else: this one was not sent", msg_id))]
            to = room.members[target].user
        room.seq += 1
        message = Message(room.seq, msg_id, sender, text, now, to=to)
        room.said[(id_key(sender), msg_id)] = (room.seq, now, to)
        if len(room.said) > self.said_ids_kept:
            room.said.popitem(last=False)
        if target is not None:              # first: the log may let it go at once
            room.private[room.seq] = (member, target)
        self._log(room, message)
        if target is not None:
            return [(member, message), (target, message)]
        room.history.append(message)
        return [(m, message) for m in room.members]

    def resume(self, member: Any, seen: int) -> list[Delivery]:
        """`member` is back on a new connection after a drop: Resumed, then
        every room event after seq `seen`, oldest first, exactly once (as
        they were sent: history=False). Events too old to be in the log are
        counted in Resumed's `lost`."""
        room = self._where[member]
        newer = [e for e in room.log if e.seq > seen]
        first_kept = newer[0].seq if newer else room.seq + 1
        lost = max(0, first_kept - seen - 1)
        events = [e for e in newer if member in room.private.get(e.seq, (member,))]
        return [(member, Resumed(room.name, room.members[member].user, room.user_list(),
                                 self.host_name, self.max_file_size, len(events), lost))] \
            + [(member, event) for event in events]

    def _log(self, room: Room, event: Message | System) -> None:
        """Keep a room event for members who come back (bounded)."""
        room.log.append(event)
        room.log_bytes += len(event.text)
        while room.log and (len(room.log) > self.log_events or room.log_bytes > self.log_bytes):
            gone = room.log.popleft()
            room.log_bytes -= len(gone.text)
            room.private.pop(gone.seq, None)

    def who(self, member: Any) -> list[Delivery]:
        return [(member, Members(self._where[member].user_list()))]

    def lookup(self, member: Any, user: str) -> Any:
        """The handle of `user` in `member`'s room (`member`'s own, for its
        own ID). Raises Refused(no_such_user) when nobody there has it."""
        room = self._where[member]
        target = room.by_key.get(id_key(user)) or room.by_look.get(look_key(user))
        if target is None:
            raise Refused("no_such_user", f"{user!r} is not in room {room.name!r}")
        return target

    def recipients(self, member: Any, to: str) -> list[Any]:
        """Who receives a file `member` sends: `to` alone, or with to="",
        everyone else in the room. Raises Refused(no_such_user) when that is
        nobody (an unknown user, oneself, an empty room).
        """
        room = self._where[member]
        if not to:
            others = [m for m in room.members if m is not member]
            if not others:
                raise Refused("no_such_user", "nobody else is in the room")
            return others
        target = room.by_key.get(id_key(to)) or room.by_look.get(look_key(to))
        if target is None:
            raise Refused("no_such_user", f"{to!r} is not in room {room.name!r}")
        if target is member:
            raise Refused("no_such_user", "you can't send a file to yourself")
        return [target]

    def leave(self, member: Any, now: float, why: str = "") -> list[Delivery]:
        """Take `member` out of its room (a no-op if it is in none).

        Everyone left is told; an empty room is forgotten with its history.
        """
        room = self._where.pop(member, None)
        if room is None:
            return []
        user = room.members.pop(member).user
        del room.by_key[id_key(user)]
        del room.by_look[look_key(user)]
        if not room.members:
            del self._rooms[id_key(room.name)]
            del self._rooms_look[look_key(room.name)]
            return []
        text = f"{user} left the room" + (f" ({why})" if why else "")
        return self._notice(room, "leave", user, text, now)

    def _notice(self, room: Room, event: str, user: str, text: str,
                now: float) -> list[Delivery]:
        room.seq += 1
        notice = System(room.seq, event, user, f"[SYSTEM] {text}", now)
        self._log(room, notice)
        return [(m, notice) for m in room.members]


def _check_lock(room: Room, password: bool, lock: Lock | None = None) -> None:
    """Refused unless a login with a `password` or without one may come into
    `room`: with `lock` (the password keyed with the room's salt) it must
    also open the room's Lock; without, only whether it may is checked."""
    if room.lock is None:
        if password:
            raise Refused("room_not_protected", f"room {room.name!r} is already open without "
                          "a password, so anyone may join it: join without one, or pick "
                          "another Room ID for a protected room")
        return
    if not password:
        raise Refused("wrong_password", f"room {room.name!r} is protected: it needs its "
                      "password (--password, or CHATROOM_PASSWORD)")
    if lock is not None and not (hmac.compare_digest(lock.salt, room.lock.salt)
                                 and hmac.compare_digest(lock.key, room.lock.key)):
        raise Refused("wrong_password", f"wrong password for room {room.name!r}")

# =============================================================================
# 6. CALLS: invitations, links and groups, as a pure state machine
# =============================================================================
# The host's rules for calls, free of I/O like ROOMS: member handles are
# whatever the caller picks (the host uses its Session objects), time
# arrives as `now`, and every method returns the news it causes as data
# (Invited, Linked, ...) for the host to turn into events, keys and
# addresses. Who is in which room, and what a user is called, is 3's
# business; media is 5's and 7's.
#
# The rules, also in README.md ("Calls"):
# - "/CHECK bob calls bob. Bob, and only bob, is told `<alice> CALL YOU`. If
#   bob calls back within the call timeout the call connects; otherwise
#   alice is told bob is busy, bob that he missed a call, and the invitation
#   is gone." A second /CHECK of the same person renews the invitation.
# - "/decline alice refuses at once."
# - A link joins two people. A call is everyone linked together, directly
#   or through others (a connected group). Connecting with someone who is
#   already in a call joins that call: every pair across the two groups is
#   linked, so everyone sees and hears everyone. A call holds at most
#   `max_size` people; beyond that both sides are told `call_full`.
# - "/hangup bob ends your link with bob only; /hangup leaves every call."
#   Hanging up on someone you invited withdraws the invitation.
# - Leaving the room or dropping off ends every link and invitation of that
#   person (`left`, `lost`).

@dataclasses.dataclass(frozen=True)
class Invited:
    """`callee` is told that `caller` calls."""
    caller: Any
    callee: Any


@dataclasses.dataclass(frozen=True)
class Missed:
    """An invitation ended unanswered (timeout, withdrawn, the caller left):
    the caller is told `busy` (unless it left), the callee that it missed it."""
    caller: Any
    callee: Any
    reason: str                     # "busy" (timed out), "withdrawn", "left", "lost"


@dataclasses.dataclass(frozen=True)
class Refusal:
    """The callee declined, or left before answering: the caller is told."""
    caller: Any
    callee: Any
    reason: str                     # "declined", "left", "lost"


@dataclasses.dataclass(frozen=True)
class Linked:
    """`a` and `b` are now in a call together: set up their media."""
    a: Any
    b: Any


@dataclasses.dataclass(frozen=True)
class Unlinked:
    """The link between `a` and `b` ended; `reason` as both are told it."""
    a: Any
    b: Any
    reason: str                     # "hangup", "left", "lost"


@dataclasses.dataclass(frozen=True)
class TooMany:
    """Connecting `a` and `b` would make a call bigger than allowed: both
    are told `call_full`."""
    a: Any
    b: Any


CallNews = Invited | Missed | Refusal | Linked | Unlinked | TooMany


class Calls:
    """Every invitation and link of one host.

    Each method returns the news it causes, in order, or raises Refused for
    a request the caller must refuse (then nothing changed). Handles are
    compared by identity and never looked inside; two handles in one call
    are in one room, which the host checks before asking.
    """

    def __init__(self, *, timeout_s: float = CALL_TIMEOUT_S,
                 max_size: int = MAX_CALL_SIZE) -> None:
        self.timeout_s = timeout_s
        self.max_size = max_size
        self._invites: dict[tuple[Any, Any], float] = {}   # (caller, callee) -> deadline
        self._peers: dict[Any, dict[Any, None]] = {}       # handle -> linked handles, in order

    # --- queries ---

    def peers(self, member: Any) -> list[Any]:
        """Everyone `member` has a link with, in the order they were linked."""
        return list(self._peers.get(member, ()))

    def linked(self, a: Any, b: Any) -> bool:
        return b in self._peers.get(a, ())

    def invited(self, caller: Any, callee: Any) -> bool:
        return (caller, callee) in self._invites

    def group(self, member: Any) -> list[Any]:
        """Everyone in `member`'s call (linked to it directly or through
        others), `member` first; [member] when it is in no call."""
        found = {member: None}
        frontier = [member]
        while frontier:
            for peer in self._peers.get(frontier.pop(0), ()):
                if peer not in found:
                    found[peer] = None
                    frontier.append(peer)
        return list(found)

    def next_deadline(self) -> float | None:
        """When the next invitation times out (for the host's timer)."""
        return min(self._invites.values(), default=None)

    # --- requests ---

    def call(self, caller: Any, callee: Any, now: float) -> list[CallNews]:
        """`caller` typed /CHECK `callee`. Connects them when `callee` had
        invited `caller`; otherwise invites (or re-invites) `callee`.
        Raises Refused: call_self, already_in_call."""
        if caller is callee:
            raise Refused("call_self", "you can't call yourself")
        if self.linked(caller, callee):
            raise Refused("already_in_call", "you are already in a call with them")
        news = self.expire(now)             # a call-back after the deadline is too late,
        if self._invites.pop((callee, caller), None) is not None:   # even if the host's
            return news + self._connect(callee, caller)             # timer hasn't run
        self._invites[(caller, callee)] = now + self.timeout_s
        return news + [Invited(caller, callee)]

    def decline(self, callee: Any, caller: Any) -> list[CallNews]:
        """`callee` typed /decline `caller`. Raises Refused(no_invitation)."""
        if self._invites.pop((caller, callee), None) is None:
            raise Refused("no_invitation", "they are not calling you")
        return [Refusal(caller, callee, "declined")]

    def hangup(self, member: Any, peer: Any = None, reason: str = "hangup") -> list[CallNews]:
        """`member` ends its link with `peer` (and withdraws an invitation to
        it), or with everyone (`peer` None). Raises Refused(not_in_call)
        when there was nothing to end."""
        news: list[CallNews] = []
        targets = [peer] if peer is not None else self.peers(member) + [
            callee for caller, callee in self._invites if caller is member]
        for target in targets:
            if self._invites.pop((member, target), None) is not None:
                news.append(Missed(member, target, "withdrawn"))
            if self.linked(member, target):
                news.append(self._unlink(member, target, reason))
        if not news:
            raise Refused("not_in_call", "you are not in a call with them")
        return news

    def leave(self, member: Any, reason: str) -> list[CallNews]:
        """`member` left the room (`left`) or dropped off (`lost`): every
        link and invitation of it ends. Never raises."""
        news: list[CallNews] = []
        for (caller, callee) in list(self._invites):
            if caller is member:
                del self._invites[(caller, callee)]
                news.append(Missed(caller, callee, reason))
            elif callee is member:
                del self._invites[(caller, callee)]
                news.append(Refusal(caller, callee, reason))
        news += [self._unlink(member, peer, reason) for peer in self.peers(member)]
        return news

    def expire(self, now: float) -> list[CallNews]:
        """Invitations whose time is up: each caller is told the callee is
        busy, each callee that it missed the call."""
        due = [pair for pair, deadline in self._invites.items() if deadline <= now]
        for pair in due:
            del self._invites[pair]
        return [Missed(caller, callee, "busy") for caller, callee in due]

    # --- inside ---

    def _connect(self, caller: Any, callee: Any) -> list[CallNews]:
        """`callee` called back: link them, each joining the other's call."""
        mine, theirs = self.group(caller), self.group(callee)
        if callee in mine:                  # one call already: relink the two
            return [self._link(caller, callee)]
        if len(mine) + len(theirs) > self.max_size:
            return [TooMany(callee, caller)]
        return [self._link(a, b) for a in mine for b in theirs]

    def _link(self, a: Any, b: Any) -> Linked:
        self._invites.pop((a, b), None)     # an invitation between them is answered
        self._invites.pop((b, a), None)
        self._peers.setdefault(a, {})[b] = None
        self._peers.setdefault(b, {})[a] = None
        return Linked(a, b)

    def _unlink(self, a: Any, b: Any, reason: str) -> Unlinked:
        for one, other in ((a, b), (b, a)):
            links = self._peers.get(one, {})
            links.pop(other, None)
            if not links:
                self._peers.pop(one, None)
        return Unlinked(a, b, reason)


# =============================================================================
# 7. MEDIA PACKETS: sealing, key agreement, payloads, fragments and reassembly
# =============================================================================
# Pure code for calls: what crosses UDP between two clients, and how video
# frames are cut into packets and put back together. No sockets, clocks or
# threads: time arrives as `now_ms`. A UDP packet holds at most
# MAX_PACKET_BYTES, so nothing fragments at the IP layer:
#
#   sealed   magic 0xC1 | kind (1) | link_id (4) | seq (8, big-endian) | AES-GCM(inner), tag (16)
#   HELLO    magic 0xC1 | KIND_HELLO | version 1 | X25519 public key (32) | UTF-8 JSON object
#
# "A packet is accepted because it authenticates, not because of its source
# address": each direction of a link has its own key (a reflected packet
# fails), and a sliding window refuses replays. `Opener.open`, `peek_header`
# and the `unpack_*` functions answer None for whatever they refuse and raise
# nothing, whatever the bytes. `cryptography` is imported where it is used.
# Control payloads (keyframe requests, NACKs, reports, byes) are MEDIA
# FLOW's: they carry what its controllers decide.

VIDEO_CODECS = ("vp8", "jpeg")      # best first; a call uses the first both sides have
AUDIO_CODECS = ("opus", "pcm")

# --- Fixed by the protocol: changing one changes the media packets ----------

MEDIA_MAGIC = 0xC1                  # first byte of every media packet
MAX_PACKET_BYTES = 1200             # whole UDP payload, at most: below any LAN MTU
KIND_VIDEO = 1
KIND_AUDIO = 2
KIND_CONTROL = 3
KIND_HELLO = 4                      # the only kind sent in clear
HELLO_VERSION = 1
CODEC_VP8 = 1                       # video codec ids
CODEC_JPEG = 2
CODEC_OPUS = 1                      # audio codec ids
CODEC_PCM16 = 2                     # PCM16 mono; 20 ms fits only up to ~28 kHz
CONTROL_KEYFRAME = 1                # body: the last frame_id received (uint32)
CONTROL_KEEPALIVE = 2               # empty body
CONTROL_NACK = 3                    # body: video fragments to send again (see Nack)
CONTROL_REPORT = 4                  # body: how our video arrives there (see Report)
CONTROL_BYE = 5                     # empty body: "I hung up" (direct calls)
MAX_NACK_ENTRIES = 16               # entries in one Nack, at most
NACK_WHOLE_FRAME = 0xFFFF           # a Nack entry's index: every fragment of that frame
FEC_GROUP = 5                       # data fragments per parity fragment
MAX_HELLO_JSON_BYTES = 1000

_SEALED_KINDS = frozenset({KIND_VIDEO, KIND_AUDIO, KIND_CONTROL})
_VIDEO_CODECS = frozenset({CODEC_VP8, CODEC_JPEG})
_AUDIO_CODECS = frozenset({CODEC_OPUS, CODEC_PCM16})
_PACKET_HEADER = struct.Struct(">BB4sQ")        # magic, kind, link_id, seq: 14 bytes
_TAG_BYTES = 16                                 # AES-GCM tag
PACKET_OVERHEAD_BYTES = _PACKET_HEADER.size + _TAG_BYTES
MAX_INNER_BYTES = MAX_PACKET_BYTES - PACKET_OVERHEAD_BYTES          # 1170
# frame_id, capture_ms, flags, codec, index, count, group, length_xor: 21 bytes
_VIDEO_HEADER = struct.Struct(">IQBBHHBH")
VIDEO_FRAGMENT_BYTES = MAX_INNER_BYTES - _VIDEO_HEADER.size         # 1149 data bytes
_AUDIO_HEADER = struct.Struct(">IQB")           # audio seq, capture_ms, codec: 13 bytes
MAX_AUDIO_PAYLOAD_BYTES = MAX_INNER_BYTES - _AUDIO_HEADER.size      # 1157
_HELLO_HEADER = struct.Struct(">BBB32s")        # magic, kind, version, public key: 35 bytes
_FLAG_KEYFRAME = 0x01
_FLAG_PARITY = 0x02

# --- Tunables ----------------------------------------------------------------

REPLAY_WINDOW = 1024                # sequence numbers an Opener remembers
STALE_MS = 500                      # a frame still incomplete after this is given up
MAX_FRAMES_IN_PROGRESS = 16         # per Reassembler
MAX_REASSEMBLY_BYTES = 4 * 1024 * 1024  # fragment bytes a Reassembler holds, at most
KEYFRAME_REQUEST_INTERVAL_MS = 300  # at most one keyframe request per this
REPAIR_QUIET_MS = 10                # a frame silent this long has lost its missing fragments
REPAIR_MIN_WAIT_MS = 20             # the least a repair is awaited, however quick they came
_CLOSED_MEMORY = 64                 # frame ids a Reassembler remembers having finished
_CATCH_UP_AFTER_MS = 200            # a jitter buffer this long over target drops frames
_MAX_LATENCY_SAMPLES = 1000         # per LinkStats interval

VIDEO_CODEC_IDS = {"vp8": CODEC_VP8, "jpeg": CODEC_JPEG}
AUDIO_CODEC_IDS = {"opus": CODEC_OPUS, "pcm": CODEC_PCM16}


def _need_cryptography() -> None:
    """MissingPackage unless `cryptography` imports (calls need it)."""
    try:
        import cryptography  # noqa: F401 (only to know it is there)
    except ImportError:
        raise MissingPackage("cryptography", "Calls") from None


# --- Sealing -------------------------------------------------------------------

def _check_bytes(value: bytes, size: int, name: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) != size:
        raise ValueError(f"{name} must be {size} bytes")
    return bytes(value)


def _hkdf(secret: bytes, info: bytes) -> bytes:
    _need_cryptography()
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def direction_keys(link_key: bytes, i_am_a: bool) -> tuple[bytes, bytes]:
    """(send_key, receive_key) for one side of a link.

    Each direction has its own key, so the two sides never use the same nonce under
    one key, and a packet reflected back to its sender fails to authenticate. Both
    sides pass the same link_key and opposite i_am_a. Raises ValueError unless
    link_key is 32 bytes.
    """
    link_key = _check_bytes(link_key, 32, "link_key")
    a_to_b = _hkdf(link_key, b"chatroom media a->b")
    b_to_a = _hkdf(link_key, b"chatroom media b->a")
    return (a_to_b, b_to_a) if i_am_a else (b_to_a, a_to_b)


class Sealer:
    """Seals the packets we send on one link, one direction; one Sealer per link.

    The sequence number (`seq`: the last one used) starts at 1 and rises by one per
    packet, so the nonce built from it never repeats under `send_key` (a key from
    `direction_keys`, never the link key itself).
    """

    def __init__(self, link_id: bytes, send_key: bytes) -> None:
        _need_cryptography()
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        self.link_id = _check_bytes(link_id, 4, "link_id")
        self._aead = AESGCM(_check_bytes(send_key, 32, "send_key"))
        self.seq = 0                # last sequence number used; 0 = none yet

    def seal(self, kind: int, inner: bytes) -> bytes:
        """The packet carrying `inner`. Raises ValueError (and uses no sequence
        number) if kind is not video, audio or control, or the packet would be
        longer than MAX_PACKET_BYTES."""
        if kind not in _SEALED_KINDS:
            raise ValueError(f"kind {kind!r} is not sealed")
        if len(inner) > MAX_INNER_BYTES:
            raise ValueError(f"inner payload of {len(inner)} bytes; at most {MAX_INNER_BYTES}")
        if self.seq >= 2 ** 64 - 1:     # unreachable in practice; a nonce must never repeat
            raise ValueError("sequence numbers used up: set up a new link")
        self.seq += 1
        header = _PACKET_HEADER.pack(MEDIA_MAGIC, kind, self.link_id, self.seq)
        return header + self._aead.encrypt(bytes(4) + header[6:], bytes(inner), header)


class Opener:
    """Opens the packets one link receives, one direction.

    `open` returns (kind, seq, inner) for a packet of this link that authenticates
    under `receive_key` and is new, else None (counted in `refused`). New, as in
    IPsec and DTLS: above the highest seq accepted, or within `window` below it and
    not accepted before.
    """

    def __init__(self, link_id: bytes, receive_key: bytes, window: int = REPLAY_WINDOW) -> None:
        _need_cryptography()
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        if window < 1:
            raise ValueError("window must be at least 1")
        self.link_id = _check_bytes(link_id, 4, "link_id")
        self.window = window
        self._aead = AESGCM(_check_bytes(receive_key, 32, "receive_key"))
        self._invalid_tag = InvalidTag
        self._top = 0               # highest sequence number accepted; 0 = none yet
        self._seen = 0              # bit i set: sequence number _top - i was accepted
        self.accepted = 0
        self.refused = 0            # malformed + not this link + forged/tampered + replayed
        self.replayed = 0           # of refused: replays and packets older than the window

    def open(self, packet: bytes) -> tuple[int, int, bytes] | None:
        """(kind, seq, inner) of an authentic new packet for this link, else None."""
        packet = bytes(packet)
        if len(packet) < PACKET_OVERHEAD_BYTES:
            self._refuse()
            return None
        magic, kind, link_id, seq = _PACKET_HEADER.unpack_from(packet)
        if magic != MEDIA_MAGIC or kind not in _SEALED_KINDS or link_id != self.link_id:
            self._refuse()
            return None
        if seq == 0 or not self._fresh(seq):
            self.replayed += 1
            self._refuse()
            return None
        header = packet[:_PACKET_HEADER.size]
        try:
            inner = self._aead.decrypt(bytes(4) + header[6:], packet[len(header):], header)
        except self._invalid_tag:
            self._refuse()
            return None
        self._mark(seq)             # only now: a forged packet must not move the window
        self.accepted += 1
        return kind, seq, inner

    def _refuse(self) -> None:
        self.refused += 1

    def _fresh(self, seq: int) -> bool:
        age = self._top - seq
        return age < 0 or (age < self.window and not (self._seen >> age) & 1)

    def _mark(self, seq: int) -> None:
        shift = seq - self._top
        if shift >= self.window:    # don't shift by up to 2**64 bits: that int would be huge
            self._seen, self._top = 1, seq
        elif shift > 0:
            self._seen = ((self._seen << shift) | 1) & ((1 << self.window) - 1)
            self._top = seq
        else:
            self._seen |= 1 << -shift


def peek_header(packet: bytes) -> tuple[int, bytes, int] | None:
    """(kind, link_id, seq) of a packet, unopened, to pick the link's Opener.

    A HELLO packet gives (KIND_HELLO, b"", 0): it has neither link id nor sequence
    number; hand it to `unpack_hello`. None if the packet is too short to be either,
    has the wrong magic or an unknown kind. Nothing here is authenticated yet.
    """
    if len(packet) < 2 or packet[0] != MEDIA_MAGIC:
        return None
    if packet[1] == KIND_HELLO:
        return (KIND_HELLO, b"", 0) if len(packet) >= _HELLO_HEADER.size else None
    if packet[1] not in _SEALED_KINDS or len(packet) < PACKET_OVERHEAD_BYTES:
        return None
    _, kind, link_id, seq = _PACKET_HEADER.unpack_from(packet)
    return kind, link_id, seq


# --- HELLO and direct-call key agreement ----------------------------------------------------

def _json_unique_pairs(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


def pack_hello(public_key: bytes, info: dict) -> bytes:
    """A HELLO packet (sent in clear) with our X25519 public key and `info`.

    Raises ValueError unless public_key is 32 bytes and info is a dict that JSON
    encodes (no NaN) to at most MAX_HELLO_JSON_BYTES of UTF-8. Keys should be str:
    JSON turns others into strings, and tuples arrive as lists.
    """
    public_key = _check_bytes(public_key, 32, "public_key")
    if not isinstance(info, dict):
        raise ValueError("info must be a dict")
    try:
        body = json.dumps(info, ensure_ascii=False, allow_nan=False,
                          separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"info is not JSON: {exc}") from None
    if len(body) > MAX_HELLO_JSON_BYTES:
        raise ValueError(f"info is {len(body)} bytes of JSON; at most {MAX_HELLO_JSON_BYTES}")
    return _HELLO_HEADER.pack(MEDIA_MAGIC, KIND_HELLO, HELLO_VERSION, public_key) + body


def unpack_hello(packet: bytes) -> tuple[bytes, dict] | None:
    """(public_key, info) of a HELLO packet; None for anything malformed: wrong magic,
    kind or version, wrong size, invalid UTF-8, not a JSON object, duplicate keys,
    NaN or infinite numbers, lone surrogates. The key itself is checked by
    `KeyExchange.agree`. Never raises for any bytes."""
    size = len(packet)
    if not _HELLO_HEADER.size < size <= _HELLO_HEADER.size + MAX_HELLO_JSON_BYTES:
        return None
    magic, kind, version, public_key = _HELLO_HEADER.unpack_from(packet)
    if (magic, kind, version) != (MEDIA_MAGIC, KIND_HELLO, HELLO_VERSION):
        return None
    try:
        info = json.loads(bytes(packet[_HELLO_HEADER.size:]).decode("utf-8"),
                          object_pairs_hook=_json_unique_pairs)
        # Accept only what pack_hello could have sent: this refuses NaN, Infinity,
        # 1e999 (parsed as inf) and lone surrogates ("\ud800" parses, can't encode).
        json.dumps(info, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, RecursionError):    # UnicodeError and JSONDecodeError are ValueErrors
        return None
    return (public_key, info) if type(info) is dict else None


@dataclasses.dataclass(frozen=True)
class DirectLink:
    """What both ends of a direct call agreed: pass link_key and i_am_a to
    `direction_keys`, link_id to Sealer and Opener. People read `safety_code` aloud
    to each other; if the codes differ, someone is in the middle."""
    link_id: bytes
    link_key: bytes = dataclasses.field(repr=False)    # a secret: kept out of logs
    i_am_a: bool
    safety_code: str


class KeyExchange:
    """One side of an X25519 key agreement for a direct call; a new one per call.

    Send `public` in a HELLO; give the peer's key to `agree`. Both sides get the same
    link_id, link_key and safety_code, and opposite i_am_a (a: the key sorting first).
    The code has 20 bits: it stops a man in the middle who must pick his keys before
    he sees both ends' keys, not one who can try a million keys afterwards.
    """

    def __init__(self, private_key: bytes | None = None) -> None:
        """A fresh random key, or (for tests) the 32 raw bytes of one."""
        _need_cryptography()
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
        self._private = (X25519PrivateKey.generate() if private_key is None
                         else X25519PrivateKey.from_private_bytes(private_key))
        self.public = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def agree(self, peer_public: bytes) -> DirectLink:
        """The link shared with the owner of `peer_public`. Raises ValueError if the key
        is not 32 bytes, is our own (a reflected HELLO) or is a low-order point."""
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
        peer = _check_bytes(peer_public, 32, "peer_public")
        if peer == self.public:
            raise ValueError("the peer's key is our own: a reflected hello")
        try:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(peer))
        except ValueError:          # cryptography refuses the all-zero shared secret
            raise ValueError("the peer's key is a low-order point") from None
        first, second = sorted((self.public, peer))
        both = first + second
        code = int.from_bytes(hashlib.sha256(b"chatroom safety code" + both).digest()[:8],
                              "big") % 1_000_000
        return DirectLink(link_id=hashlib.sha256(b"chatroom link id" + both).digest()[:4],
                          link_key=_hkdf(shared, b"chatroom direct link key" + both),
                          i_am_a=self.public == first,
                          safety_code=f"{code // 1000:03d} {code % 1000:03d}")


# --- Inner payloads --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class VideoFragment:
    """One video inner payload: a 21-byte header, then `data`.

    Header (big-endian): frame_id u32, capture_ms u64, flags u8 (bit 0 keyframe, bit 1
    parity), codec u8, index u16, count u16, group u8, length_xor u16. `count` is the
    frame's number of data fragments; `group` the data fragments per FEC group, the
    last group may be shorter. A data fragment has index 0..count-1 and length_xor 0.
    A parity fragment has index = its group's number; its data is the XOR of that
    group's data, each padded with zeros to the longest, and length_xor the XOR of
    their lengths, so one lost fragment per group is rebuilt with its true length.
    """
    frame_id: int
    capture_ms: int
    keyframe: bool
    parity: bool
    codec: int
    index: int
    count: int
    group: int
    length_xor: int
    data: bytes


def _video_problem(f: VideoFragment) -> str | None:
    if f.codec not in _VIDEO_CODECS:
        return f"unknown video codec {f.codec!r}"
    if not (1 <= f.count <= 0xFFFF and 1 <= f.group <= 0xFF):
        return "count and group must be at least 1"
    if f.parity and not 0 <= f.index < -(-f.count // f.group):
        return f"parity for group {f.index} of a frame with {f.count} fragments"
    if not f.parity and not (0 <= f.index < f.count and f.length_xor == 0):
        return f"data fragment {f.index} of {f.count}"
    return None


def pack_video(fragment: VideoFragment) -> bytes:
    """The inner payload for `fragment`. Raises ValueError if a field is out of range or
    inconsistent, or the payload would not fit in one packet. The format's
    reference, one fragment at a time: unpack_video's inverse, for tests and
    fuzzing; the sender (`fragment`) packs a whole frame in one go."""
    problem = _video_problem(fragment)
    if problem is None and len(fragment.data) > VIDEO_FRAGMENT_BYTES:
        problem = f"{len(fragment.data)} data bytes; at most {VIDEO_FRAGMENT_BYTES}"
    if problem:
        raise ValueError(problem)
    f = fragment
    flags = (_FLAG_KEYFRAME if f.keyframe else 0) | (_FLAG_PARITY if f.parity else 0)
    try:
        header = _VIDEO_HEADER.pack(f.frame_id, f.capture_ms, flags, f.codec, f.index,
                                    f.count, f.group, f.length_xor)
    except struct.error as exc:
        raise ValueError(str(exc)) from None
    return header + bytes(f.data)


def unpack_video(inner: bytes) -> VideoFragment | None:
    """The fragment in a video inner payload, or None if it is malformed."""
    if len(inner) < _VIDEO_HEADER.size:
        return None
    frame_id, capture_ms, flags, codec, index, count, group, length_xor = \
        _VIDEO_HEADER.unpack_from(inner)
    if flags & ~(_FLAG_KEYFRAME | _FLAG_PARITY):
        return None
    frag = VideoFragment(frame_id, capture_ms, bool(flags & _FLAG_KEYFRAME),
                         bool(flags & _FLAG_PARITY), codec, index, count, group, length_xor,
                         bytes(inner[_VIDEO_HEADER.size:]))
    return None if _video_problem(frag) else frag


def video_capture_ms(inner: bytes) -> int | None:
    """The capture time a video inner payload's header claims, unchecked (for
    ReportMeter's delay); None if too short to have one."""
    return _VIDEO_HEADER.unpack_from(inner)[1] if len(inner) >= _VIDEO_HEADER.size else None


@dataclasses.dataclass(frozen=True)
class AudioFrame:
    """One audio inner payload: seq u32 (one per 20 ms frame, only increasing for the
    life of the stream), capture_ms u64, codec u8, then `payload`."""
    seq: int
    capture_ms: int
    codec: int
    payload: bytes


def pack_audio(frame: AudioFrame) -> bytes:
    """The inner payload for `frame`. Raises ValueError for an unknown codec, a field
    out of range or a payload over MAX_AUDIO_PAYLOAD_BYTES."""
    if frame.codec not in _AUDIO_CODECS or len(frame.payload) > MAX_AUDIO_PAYLOAD_BYTES:
        raise ValueError("unknown audio codec or payload too long")
    try:
        return _AUDIO_HEADER.pack(frame.seq, frame.capture_ms, frame.codec) + bytes(frame.payload)
    except struct.error as exc:
        raise ValueError(str(exc)) from None


def unpack_audio(inner: bytes) -> AudioFrame | None:
    """The frame in an audio inner payload, or None if it is malformed."""
    if len(inner) < _AUDIO_HEADER.size:
        return None
    seq, capture_ms, codec = _AUDIO_HEADER.unpack_from(inner)
    if codec not in _AUDIO_CODECS:
        return None
    return AudioFrame(seq, capture_ms, codec, bytes(inner[_AUDIO_HEADER.size:]))


# --- Video: fragmenting with FEC, reassembly, the keyframe gate ------------------------------

def _xor(pieces: list[bytes]) -> tuple[int, int]:
    """(XOR of the pieces as little-endian ints, XOR of their lengths). Little-endian
    makes padding free: the zeros that pad a short piece are its high bytes."""
    value = length = 0
    for piece in pieces:
        value ^= int.from_bytes(piece, "little")
        length ^= len(piece)
    return value, length


def fragment(frame_id: int, data: bytes, capture_ms: int, keyframe: bool, codec: int,
             max_fragment: int = VIDEO_FRAGMENT_BYTES, fec_group: int = FEC_GROUP,
             parity: bool = True) -> list[bytes]:
    """The video inner payloads for one frame, in sending order; seal each as KIND_VIDEO.

    Pieces of max_fragment bytes (an empty frame: one empty piece), each group of up to
    fec_group followed by its parity fragment (see VideoFragment), or by none when
    `parity` is False (repair by retransmission alone). Raises ValueError for a field
    out of range or a frame of more than 65535 pieces.
    """
    if not 1 <= max_fragment <= VIDEO_FRAGMENT_BYTES or not 1 <= fec_group <= 0xFF:
        raise ValueError("max_fragment or fec_group out of range")
    if codec not in _VIDEO_CODECS or not 0 <= frame_id <= 0xFFFFFFFF \
            or not 0 <= capture_ms < 2 ** 64:
        raise ValueError("codec, frame_id or capture_ms out of range")
    data = bytes(data)
    pieces = [data[i:i + max_fragment] for i in range(0, len(data), max_fragment)] or [b""]
    count = len(pieces)
    if count > 0xFFFF:
        raise ValueError(f"a frame of {len(data)} bytes needs too many fragments")
    key = _FLAG_KEYFRAME if keyframe else 0
    out = []
    for number, start in enumerate(range(0, count, fec_group)):
        group = pieces[start:start + fec_group]
        for index, piece in enumerate(group, start):
            out.append(_VIDEO_HEADER.pack(frame_id, capture_ms, key, codec, index, count,
                                          fec_group, 0) + piece)
        if parity:
            value, length_xor = _xor(group)
            out.append(_VIDEO_HEADER.pack(frame_id, capture_ms, key | _FLAG_PARITY, codec,
                                          number, count, fec_group, length_xor)
                       + value.to_bytes(max(map(len, group)), "little"))
    return out


@dataclasses.dataclass(frozen=True)
class Frame:
    """A whole video frame, ready for the decoder (after the KeyframeGate)."""
    frame_id: int
    data: bytes
    capture_ms: int
    keyframe: bool
    codec: int


class _Partial:
    """One frame being put back together. `blocked` counts FEC groups that can't be
    finished yet: more than one data fragment missing, or one and no parity.

    Fragments leave the sender in one order (each group's data, then its parity), so
    a fragment's place in it (`_place`) says which earlier ones can no longer come."""

    def __init__(self, first: VideoFragment, now_ms: float) -> None:
        self.first_ms = now_ms
        self.last_ms = now_ms       # the newest fragment's arrival
        self.shape = (first.capture_ms, first.keyframe, first.codec, first.count, first.group)
        self.data: dict[int, bytes] = {}
        self.parity: dict[int, tuple[int, bytes]] = {}   # group -> (length_xor, data)
        groups = -(-first.count // first.group)
        self.missing = [min(first.group, first.count - g * first.group) for g in range(groups)]
        self.blocked = groups
        self.held_bytes = 0
        self.top = -1               # the latest place in the sending order seen
        self.lost_ms: float | None = None   # when we first knew a fragment of it was lost
        self.asked: set[int] = set()        # data fragments asked for again
        self.asked_ms: float | None = None  # when we last asked
        self.whole_asked = False            # the whole frame was asked for
        self.resent = 0             # fragments that came after we asked for them

    def _place(self, f: VideoFragment) -> int:
        group = self.shape[4]
        if not f.parity:
            return f.index + f.index // group
        return f.index * (group + 1) + self._size(f.index)

    def _size(self, g: int) -> int:
        """Data fragments in group g."""
        count, group = self.shape[3], self.shape[4]
        return min(group, count - g * group)

    def _is_blocked(self, g: int) -> bool:
        return self.missing[g] > 1 or (self.missing[g] == 1 and g not in self.parity)

    def add(self, f: VideoFragment, now_ms: float) -> bool:
        """Store a fragment; False if it was already here."""
        g = f.index if f.parity else f.index // f.group
        if (self.parity if f.parity else self.data).get(f.index) is not None:
            return False
        was = self._is_blocked(g)
        if f.parity:
            self.parity[g] = (f.length_xor, f.data)
        else:
            self.data[f.index] = f.data
            self.missing[g] -= 1
            self.resent += self.whole_asked or f.index in self.asked
        self.blocked += self._is_blocked(g) - was
        self.held_bytes += len(f.data)
        self.top = max(self.top, self._place(f))
        self.last_ms = now_ms
        return True

    def lost(self, now_ms: float, quiet_ms: float, newer: bool, parity: bool) -> list[int]:
        """Data fragments that can no longer come nor be rebuilt from parity, not asked
        for before (each is named once). A group's fate is known once a fragment
        sent after it arrived (its parity, if the stream has `parity`), a `newer`
        frame did, or nothing came for quiet_ms."""
        settled = newer or now_ms - self.last_ms >= quiet_ms
        group, out = self.shape[4], []
        for g in range(len(self.missing)):
            size = self._size(g)
            end = g * (group + 1) + size - (not parity)     # its last place in the order
            if not self._is_blocked(g) or not (settled or self.top >= end):
                continue
            absent = [i for i in range(g * group, g * group + size) if i not in self.data]
            if g in self.parity:
                absent.pop()        # the parity rebuilds one of them
            out += [i for i in absent if i not in self.asked]
        self.asked.update(out)
        if out:
            self.asked_ms = now_ms
            if self.lost_ms is None:
                self.lost_ms = now_ms
        return [] if self.whole_asked else out

    def assemble(self) -> tuple[bytes, bool] | None:
        """(frame data, repaired?) once blocked == 0; None if the parity contradicts
        the data (a broken sender)."""
        group, repaired = self.shape[4], False
        for g, missing in enumerate(self.missing):
            if not missing:
                continue
            length_xor, parity = self.parity[g]
            indices = range(g * group, min((g + 1) * group, self.shape[3]))
            lost = next(i for i in indices if i not in self.data)
            value, length = _xor([self.data[i] for i in indices if i != lost])
            length ^= length_xor
            if length > len(parity):
                return None
            try:
                self.data[lost] = (int.from_bytes(parity, "little") ^ value).to_bytes(
                    length, "little")
            except OverflowError:   # non-zero bytes past the length the parity claims
                return None
            repaired = True
        return b"".join(self.data[i] for i in range(self.shape[3])), repaired


class Reassembler:
    """Puts one incoming video stream's frames back together, in order.

    `add` takes a video inner payload (from an Opener) and returns the frames now
    ready, possibly rebuilt from parity: frame ids only ever increasing, never twice.
    Never raises for any bytes.

    A decoder wants every frame in order, so a complete frame waits while an older
    one is incomplete: for `wait_ms` after we knew that older frame had lost
    something (time for a repair: see `lost`), then the older one is given up.
    wait_ms is four times the repair round trip measured so far (what we asked for
    took that long to come), within REPAIR_MIN_WAIT_MS and hold_ms; hold_ms 0 (no
    repair) gives it up at once. Frames incomplete after stale_ms, beyond max_frames
    in progress or waiting, or beyond max_bytes held are given up too, oldest first.
    With hold_ms > 0, frame ids skipped altogether (nothing of them came) are
    awaited like incomplete frames, up to max_frames of them.

    `lost(now_ms)` names, once each, the data fragments known lost that parity can't
    replace, and the frames of which nothing came: what to ask the sender for.
    `poll(now_ms)` gives up what waited too long and returns the frames that frees;
    call it on a timer when packets may stop.

    Counters: completed (of which repaired by parity, recovered by fragments sent
    again), incomplete (frames given up), resent (fragments that came after we asked
    for them), late (fragments of frames already given up or passed over),
    duplicates (fragments already held, or of a frame already complete), malformed
    (fragments that don't parse or contradict earlier fragments of their frame).
    """

    def __init__(self, stale_ms: float = STALE_MS, max_frames: int = MAX_FRAMES_IN_PROGRESS,
                 max_bytes: int = MAX_REASSEMBLY_BYTES, hold_ms: float = 0,
                 quiet_ms: float = REPAIR_QUIET_MS) -> None:
        self.stale_ms = stale_ms
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.hold_ms = hold_ms
        self.quiet_ms = quiet_ms
        self._partials: dict[int, _Partial] = {}        # frame_id -> frame in progress
        self._ghosts: dict[int, float] = {}     # frame ids nothing came of -> noticed at
        self._ghosts_asked: dict[int, float] = {}   # of those, asked for (when)
        self._parity_seen = False               # the stream carries parity fragments
        self.repair_rtt_ms: float | None = None     # smoothed: asking to getting
        self._ready: dict[int, Frame] = {}      # complete, waiting for older frames
        self._closed: collections.OrderedDict[int, bool] = collections.OrderedDict()
        # ^ recently finished frame ids -> True if complete, False if given up
        self._top_id: int | None = None         # the highest frame id seen
        self.newest = -1            # frame id last delivered; -1 = none yet
        self.held_bytes = 0
        self.completed = self.repaired = self.recovered = self.incomplete = 0
        self.resent = self.late = self.duplicates = self.malformed = 0

    @property
    def in_progress(self) -> int:
        return len(self._partials)

    @property
    def wait_ms(self) -> float:
        """How long a complete frame waits for an older one's repair."""
        if self.hold_ms <= 0 or self.repair_rtt_ms is None:
            return self.hold_ms
        return min(self.hold_ms, max(REPAIR_MIN_WAIT_MS, 4 * self.repair_rtt_ms))

    def add(self, inner: bytes, now_ms: float) -> list[Frame]:
        out = self.poll(now_ms)
        f = unpack_video(inner)
        if f is None:
            self.malformed += 1
            return out
        if f.frame_id <= self.newest or f.frame_id in self._closed:
            if self._closed.get(f.frame_id):
                self.duplicates += 1
            else:
                self.late += 1
            return out
        self._saw(f.frame_id, now_ms)
        partial = self._partials.get(f.frame_id)
        if partial is None:
            if len(self._partials) >= self.max_frames:
                oldest = min(self._partials)
                if f.frame_id < oldest:     # full of newer frames: this one is the oldest
                    self._ghosts.pop(f.frame_id, None)
                    self.incomplete += 1
                    self._close(f.frame_id, False)
                    return out
                self._give_up(oldest)
            partial = self._partials[f.frame_id] = _Partial(f, now_ms)
            if f.frame_id in self._ghosts:  # a frame we had given up for lost
                partial.lost_ms = self._ghosts.pop(f.frame_id)
                partial.asked_ms = self._ghosts_asked.pop(f.frame_id, None)
                partial.whole_asked = partial.asked_ms is not None
        if partial.shape != (f.capture_ms, f.keyframe, f.codec, f.count, f.group):
            self.malformed += 1
            return out
        before, resent = partial.held_bytes, partial.resent
        if not partial.add(f, now_ms):
            self.duplicates += 1
            return out
        self._parity_seen |= f.parity
        if partial.resent > resent and partial.asked_ms is not None:
            sample = now_ms - partial.asked_ms
            self.resent += 1
            self.repair_rtt_ms = sample if self.repair_rtt_ms is None else (
                self.repair_rtt_ms + (sample - self.repair_rtt_ms) / 8)
        self.held_bytes += partial.held_bytes - before
        while self.held_bytes > self.max_bytes and (self._partials or self._ghosts):
            self._give_up(min([*self._partials, *self._ghosts]))
        if f.frame_id in self._partials and partial.blocked == 0:
            self._complete(f.frame_id, partial)
        return out + self._release(now_ms)

    def lost(self, now_ms: float) -> list[tuple[int, list[int] | None]]:
        """(frame_id, data indices) of fragments known lost, and (frame_id, None) for
        frames nothing came of, oldest first; each is named once, then awaited."""
        out: list[tuple[int, list[int] | None]] = []
        for frame_id in sorted(set(self._ghosts) - set(self._ghosts_asked)):
            self._ghosts_asked[frame_id] = now_ms
            out.append((frame_id, None))
        top = self._top_id if self._top_id is not None else -1
        for frame_id in sorted(self._partials):
            indices = self._partials[frame_id].lost(now_ms, self.quiet_ms, frame_id < top,
                                                    self._parity_seen)
            if indices:
                out.append((frame_id, indices))
        return out

    def poll(self, now_ms: float) -> list[Frame]:
        """Give up what waited too long (see the class); the frames that frees."""
        self.expire(now_ms)
        return self._release(now_ms)

    def expire(self, now_ms: float) -> int:
        """Give up frames incomplete for longer than stale_ms; return how many.
        `add` and `poll` call this."""
        stale = [i for i, p in self._partials.items() if now_ms - p.first_ms > self.stale_ms]
        stale += [i for i, since in self._ghosts.items() if now_ms - since > self.stale_ms]
        for frame_id in stale:
            self._give_up(frame_id)
        return len(stale)

    def _saw(self, frame_id: int, now_ms: float) -> None:
        """A fragment of frame_id came: what was sent before it can't come any more."""
        top = self._top_id
        if top is not None and frame_id > top + 1 and self.hold_ms > 0 \
                and frame_id - top - 1 <= self.max_frames:
            for skipped in range(top + 1, frame_id):
                if skipped not in self._closed:
                    self._ghosts[skipped] = now_ms
            while len(self._ghosts) > self.max_frames:
                self._give_up(min(self._ghosts))
        for older, partial in self._partials.items():
            if older < frame_id and partial.lost_ms is None:
                partial.lost_ms = now_ms
        self._top_id = frame_id if top is None else max(top, frame_id)

    def _give_up(self, frame_id: int) -> None:
        partial = self._partials.pop(frame_id, None)
        if partial is not None:
            self.held_bytes -= partial.held_bytes
        self._ghosts.pop(frame_id, None)
        self._ghosts_asked.pop(frame_id, None)
        self.incomplete += 1
        self._close(frame_id, False)

    def _close(self, frame_id: int, complete: bool) -> None:
        self._closed[frame_id] = complete
        while len(self._closed) > _CLOSED_MEMORY:
            self._closed.popitem(last=False)

    def _complete(self, frame_id: int, partial: _Partial) -> None:
        self.held_bytes -= self._partials.pop(frame_id).held_bytes
        result = partial.assemble()
        if result is None:
            self.malformed += 1
            self.incomplete += 1
            self._close(frame_id, False)
            return
        self._close(frame_id, True)
        self.completed += 1
        self.repaired += result[1]
        self.recovered += partial.resent > 0
        capture_ms, keyframe, codec = partial.shape[:3]
        self._ready[frame_id] = Frame(frame_id, result[0], capture_ms, keyframe, codec)
        self.held_bytes += len(result[0])

    def _release(self, now_ms: float) -> list[Frame]:
        out: list[Frame] = []
        while self._ready:
            first = min(self._ready)
            older = [i for i in (*self._partials, *self._ghosts) if i < first]
            if older:
                oldest = min(older)
                partial = self._partials.get(oldest)
                since = self._ghosts.get(oldest) if partial is None else partial.lost_ms
                if len(self._ready) <= self.max_frames and now_ms - (
                        now_ms if since is None else since) < self.wait_ms:
                    break           # a repair may still come
                self._give_up(oldest)
                continue
            frame = self._ready.pop(first)
            self.held_bytes -= len(frame.data)
            self.newest = first
            out.append(frame)
        return out


# =============================================================================
# 8. MEDIA FLOW: control messages, repair, rate, the keyframe gate, statistics
# =============================================================================
# Pure code for calls, like 5: what each end decides as packets come in and
# clocks tick, and the control messages that carry it. A receiver's
# VideoReceiver asks for lost fragments once (a Nack) before its keyframe
# gate asks for a keyframe, and its ReportMeter says how the media arrives;
# a sender's Retransmitter answers Nacks from a FragmentCache within bounds a
# peer can't stretch, and its RateController turns Reports into a bitrate, a
# frame rate and a size. LinkStats counts what media_stats reports. When
# what arrives is played is PLAYOUT's (next). Time arrives as `now_ms`; no
# sockets, threads or clocks here.

# --- Tunables ----------------------------------------------------------------------------

REPAIR_WAIT_MS = 100                # a newer frame waits at most this long for an older repair
RESEND_FRAMES = 32                  # frames a sender keeps for Nacks (about a second)
RESEND_BYTES = 2 * 1024 * 1024      # and bytes, at most
RESEND_PER_S = 120                  # fragments sent again to one link a second, at most
RESEND_BURST = 60                   # and at once
REPORT_INTERVAL_MS = 250            # a receiver reports how media arrives this often
DELAY_BASE_MS = 10_000              # queuing delay is measured over the quickest in this
REPORT_STALE_MS = 1500              # a link that stopped reporting counts as congested
LOSS_HIGH_BP = 1000                 # loss above this (1/10000) is congestion: slow down
LOSS_LOW_BP = 200                   # below this, and
LOSS_SMOOTHING = 4                  # loss is judged over about this many reports too
DELAY_HIGH_MS = 100                 # queuing delay above this is congestion
DELAY_LOW_MS = 30                   # below this, the link is clear: speed up
RATE_DECREASE = 0.85                # bitrate after congestion, at most this share of before
RATE_INCREASE_PER_S = 0.12          # while clear, bitrate grows this share a second
RATE_STEP = 0.85                    # bitrates come in steps, each this share of the one above
RATE_MIN_SHARE = 0.08               # the lowest bitrate, as a share of the highest
INCREASE_AFTER_MS = 1000            # no increase this soon after a decrease
SIZE_HOLD_MS = 3000                 # no size change up this soon after another (a keyframe)
# (bitrate at least this share of the highest, frames a second, size divisor): first
# the bitrate falls, then the frame rate, then the picture's size.
RATE_LADDER = ((0.35, 30, 1), (0.22, 20, 1), (0.15, 15, 1), (0.10, 15, 2), (0.0, 10, 2))
RATE_UP_MARGIN = 1.2                # a bigger size needs this much more than its rung


# --- Control messages -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Control:
    """A control inner payload: type u8, then its body. CONTROL_KEYFRAME ("send a
    keyframe") carries last_frame_id u32, the last frame id received; CONTROL_KEEPALIVE
    (sent when there is no media, so the link does not look dead) has no body and
    last_frame_id 0, and so has CONTROL_BYE ("I hung up": a direct call has no host
    to say it, so the peer ends the link at once instead of waiting for silence; it
    is sealed like all media, so nobody else can end a call with one, and a peer
    that predates it drops it as an unknown type). Nack and Report are the other
    two types."""
    type: int
    last_frame_id: int = 0


_EMPTY_CONTROLS = frozenset({CONTROL_KEEPALIVE, CONTROL_BYE})     # types with no body
_NACK_ENTRY = struct.Struct(">IHH")             # frame_id, index, mask: 8 bytes
_REPORT = struct.Struct(">BHHI")                # type, loss_bp, delay_ms, kbps: 9 bytes


@dataclasses.dataclass(frozen=True)
class Nack:
    """CONTROL_NACK, "these video fragments never came": a receiver asks once, before
    it asks for a keyframe. Body: n u8 (1..MAX_NACK_ENTRIES), then n entries of
    frame_id u32, index u16, mask u16: data fragment `index` of that frame, and
    index + 1 + i for each bit i set in mask (an entry names up to 17). An index of
    NACK_WHOLE_FRAME, with mask 0, asks for every data fragment of a frame of which
    nothing arrived. At most 130 bytes, whatever is asked: what the sender does with
    it is bounded by its Retransmitter, not by the peer."""
    entries: tuple[tuple[int, int, int], ...]   # (frame_id, index, mask)
    type: ClassVar[int] = CONTROL_NACK

    @classmethod
    def asking(cls, lost: Iterable[tuple[int, Iterable[int] | None]]) -> list[Nack]:
        """The Nacks that ask for `lost`: (frame_id, data indices), or (frame_id,
        None) for a whole frame. Several when one would pass MAX_NACK_ENTRIES."""
        entries: list[tuple[int, int, int]] = []
        for frame_id, indices in lost:
            if indices is None:
                entries.append((frame_id, NACK_WHOLE_FRAME, 0))
                continue
            first: int | None = None
            mask = 0
            for index in sorted(set(indices)):
                if first is not None and index - first <= 16:
                    mask |= 1 << (index - first - 1)
                    continue
                if first is not None:
                    entries.append((frame_id, first, mask))
                first, mask = index, 0
            if first is not None:
                entries.append((frame_id, first, mask))
        return [cls(tuple(entries[i:i + MAX_NACK_ENTRIES]))
                for i in range(0, len(entries), MAX_NACK_ENTRIES)]

    def wanted(self) -> list[tuple[int, int | None]]:
        """(frame_id, data index) for each fragment asked for; index None: all of it."""
        out: list[tuple[int, int | None]] = []
        for frame_id, index, mask in self.entries:
            if index == NACK_WHOLE_FRAME:
                out.append((frame_id, None))
                continue
            out.append((frame_id, index))
            out += [(frame_id, index + 1 + i) for i in range(16) if mask >> i & 1]
        return out


@dataclasses.dataclass(frozen=True)
class Report:
    """CONTROL_REPORT, a receiver's word on how the media from us arrives, a few
    times a second, for the sender's RateController. Body: loss_bp u16 (packets lost
    before any repair, in 1/10000: 0..10000), delay_ms u16 (queuing delay: how much
    longer than the quickest lately this interval's packets took), kbps u32
    (received, every kind)."""
    loss_bp: int
    delay_ms: int
    kbps: int
    type: ClassVar[int] = CONTROL_REPORT


def pack_control(control: Control | Nack | Report) -> bytes:
    """The inner payload for `control`. Raises ValueError for an unknown type or a
    field out of range (a keepalive's or bye's frame id not 0; an empty, too long or
    inconsistent Nack; a Report's loss over 10000)."""
    if isinstance(control, Nack):
        entries = control.entries
        if not 1 <= len(entries) <= MAX_NACK_ENTRIES or any(
                index == NACK_WHOLE_FRAME and mask for _, index, mask in entries):
            raise ValueError(f"can't pack {control!r}")
        try:
            return bytes([CONTROL_NACK, len(entries)]) + b"".join(
                _NACK_ENTRY.pack(*entry) for entry in entries)
        except struct.error as exc:
            raise ValueError(str(exc)) from None
    if isinstance(control, Report):
        if not 0 <= control.loss_bp <= 10000:
            raise ValueError(f"loss of {control.loss_bp} / 10000")
        try:
            return _REPORT.pack(CONTROL_REPORT, control.loss_bp, control.delay_ms,
                                control.kbps)
        except struct.error as exc:
            raise ValueError(str(exc)) from None
    if control.type in _EMPTY_CONTROLS and control.last_frame_id == 0:
        return bytes([control.type])
    if control.type == CONTROL_KEYFRAME and 0 <= control.last_frame_id <= 0xFFFFFFFF:
        return struct.pack(">BI", CONTROL_KEYFRAME, control.last_frame_id)
    raise ValueError(f"can't pack {control!r}")


def unpack_control(inner: bytes) -> Control | Nack | Report | None:
    """The control message in an inner payload, or None if it is malformed: an
    unknown type, a length its type doesn't have, a Nack with no entries, more than
    MAX_NACK_ENTRIES or a whole-frame entry with a mask, a Report's loss over 10000."""
    size = len(inner)
    if size == 1 and inner[0] in _EMPTY_CONTROLS:
        return Control(inner[0])
    if size == 5 and inner[0] == CONTROL_KEYFRAME:
        return Control(CONTROL_KEYFRAME, int.from_bytes(inner[1:], "big"))
    if size >= 2 and inner[0] == CONTROL_NACK and 1 <= inner[1] <= MAX_NACK_ENTRIES \
            and size == 2 + inner[1] * _NACK_ENTRY.size:
        entries = tuple(_NACK_ENTRY.iter_unpack(bytes(inner[2:])))
        if any(index == NACK_WHOLE_FRAME and mask for _, index, mask in entries):
            return None
        return Nack(entries)
    if size == _REPORT.size and inner[0] == CONTROL_REPORT:
        _, loss_bp, delay_ms, kbps = _REPORT.unpack(bytes(inner))
        return Report(loss_bp, delay_ms, kbps) if loss_bp <= 10000 else None
    return None


class GateState(enum.Enum):
    """Where a KeyframeGate is; it starts AWAITING_KEYFRAME."""
    DECODING = "decoding"           # the decoder has every frame since a keyframe
    AWAITING_KEYFRAME = "awaiting keyframe"


@dataclasses.dataclass(frozen=True)
class GateVerdict:
    """What to do with one frame, from KeyframeGate.check."""
    decode: bool                    # feed this frame to the decoder
    request_keyframe: bool          # send Control(CONTROL_KEYFRAME, gate.last_frame_id) now


class KeyframeGate:
    """Keeps delta frames from a decoder that has lost its reference.

    Give `check` every Frame a Reassembler returns, in order. For an inter-frame
    codec (VP8), a gap in frame ids (a frame given up), a change of codec or a
    `decoder_failed` call means: decode nothing until the next keyframe, and ask
    for one, at most once per request_interval_ms. A new gate waits for a keyframe,
    since a decoder can't start on a delta frame. JPEG frames are all decoded.
    """

    def __init__(self, request_interval_ms: float = KEYFRAME_REQUEST_INTERVAL_MS) -> None:
        self.request_interval_ms = request_interval_ms
        self.state = GateState.AWAITING_KEYFRAME
        self.last_frame_id: int | None = None   # last frame checked: the request's body
        self._codec: int | None = None
        self._last_request_ms: float | None = None
        self.skipped = 0            # frames not decoded
        self.requests = 0           # keyframe requests asked for

    def check(self, frame: Frame, now_ms: float) -> GateVerdict:
        gap = self.last_frame_id is not None and frame.frame_id != self.last_frame_id + 1
        if gap or frame.codec != self._codec:
            self.state = GateState.AWAITING_KEYFRAME
        self.last_frame_id, self._codec = frame.frame_id, frame.codec
        if frame.codec == CODEC_JPEG:
            return GateVerdict(True, False)
        if frame.keyframe:
            self.state = GateState.DECODING
        if self.state is GateState.DECODING:
            return GateVerdict(True, False)
        self.skipped += 1
        return GateVerdict(False, self._may_request(now_ms))

    def decoder_failed(self, now_ms: float) -> bool:
        """The decoder refused a frame: wait for a keyframe. True = send a request now."""
        self.state = GateState.AWAITING_KEYFRAME
        return self._may_request(now_ms)

    def _may_request(self, now_ms: float) -> bool:
        if self._last_request_ms is not None \
                and now_ms - self._last_request_ms < self.request_interval_ms:
            return False
        self._last_request_ms = now_ms
        self.requests += 1
        return True


# --- Video in: repair, then the keyframe gate --------------------------------------------

class VideoReceiver:
    """One link's incoming video, from packets to the frames its decoder may take.

    Give `packet` every video inner payload, and call `poll` often (with every packet
    of any kind, and on a timer): each returns (frames to decode, in order; control
    inner payloads to send back). With `repair`, the data fragments parity can't
    rebuild are asked for once, in a Nack, as soon as they are known lost, and newer
    frames wait up to wait_ms for them; a frame still missing then is given up and
    the KeyframeGate asks for a keyframe. Without, a frame is given up as soon as a
    newer one is complete (there is nothing to wait for). `decoder_failed` when the
    decoder refuses a frame. Counters: `nacks` (Nack packets asked to send), and the
    Reassembler's and the gate's.
    """

    def __init__(self, repair: bool = True, wait_ms: float = REPAIR_WAIT_MS,
                 request_interval_ms: float = KEYFRAME_REQUEST_INTERVAL_MS) -> None:
        self.repair = repair
        self.reassembler = Reassembler(hold_ms=wait_ms if repair else 0)
        self.gate = KeyframeGate(request_interval_ms)
        self.nacks = 0

    def packet(self, inner: bytes, now_ms: float) -> tuple[list[Frame], list[bytes]]:
        return self._pass(self.reassembler.add(inner, now_ms), now_ms)

    def poll(self, now_ms: float) -> tuple[list[Frame], list[bytes]]:
        return self._pass(self.reassembler.poll(now_ms), now_ms)

    def decoder_failed(self, now_ms: float) -> list[bytes]:
        """The decoder refused a frame (or fell behind): a keyframe request, or none
        if one went out less than the gate's interval ago."""
        return [self.keyframe_request()] if self.gate.decoder_failed(now_ms) else []

    def keyframe_request(self) -> bytes:
        return pack_control(Control(CONTROL_KEYFRAME, self.gate.last_frame_id or 0))

    def _pass(self, frames: list[Frame], now_ms: float) -> tuple[list[Frame], list[bytes]]:
        controls = []
        if self.repair:
            for nack in Nack.asking(self.reassembler.lost(now_ms)):
                controls.append(pack_control(nack))
                self.nacks += 1
        decode, keyframe = [], False
        for frame in frames:
            verdict = self.gate.check(frame, now_ms)
            keyframe |= verdict.request_keyframe
            if verdict.decode:
                decode.append(frame)
        if keyframe:
            controls.append(self.keyframe_request())
        return decode, controls


# --- Link statistics ---------------------------------------------------------------------

class LinkStats:
    """Receive-side numbers for one link, for the call window, once a second.

    Feed it every opened packet (`packet`), every refused one (`refused`), every
    video frame shown and audio frame received; `snapshot(now_ms)` returns the dict
    below for the interval since the last snapshot and starts a new one:
    video_fps (frames shown per second), audio_frames (received), loss (fraction
    0..1 of packets missing, as RTCP's "fraction lost": from the highest sequence
    number at the last snapshot to the highest now), latency_ms (median of now -
    capture time of the frames shown, less the time lip sync held each frame for
    its sound: capture to decode; the two clocks' offset included; None if no
    frame), delay_ms (the same with the hold: capture to shown), kbps (received),
    dropped (packets refused since the start), freeze_ms (the longest the picture
    stood still: time between two frames shown, for those shown this interval, the
    first counted from the one before it; None if none).
    """

    def __init__(self, now_ms: float) -> None:
        self._since = now_ms        # start of the interval
        self._top: int | None = None    # highest sequence number at the last snapshot
        self._high: int | None = None   # highest this interval
        self._low: int | None = None    # lowest this interval
        self._packets = self._bytes = self._shown = self._audio = self._refused = 0
        self._latencies: list[float] = []
        self._delays: list[float] = []
        self._shown_ms: float | None = None     # when the last frame was shown
        self._freeze: float | None = None       # the longest gap ending this interval

    def packet(self, seq: int, size_bytes: int, now_ms: float) -> None:
        self._packets += 1
        self._bytes += size_bytes
        self._high = seq if self._high is None else max(self._high, seq)
        self._low = seq if self._low is None else min(self._low, seq)

    def refused(self) -> None:
        self._refused += 1

    def frame_shown(self, capture_ms: float, now_ms: float, held_ms: float = 0.0) -> None:
        self._shown += 1
        if len(self._latencies) < _MAX_LATENCY_SAMPLES:
            self._latencies.append(now_ms - capture_ms - held_ms)
            self._delays.append(now_ms - capture_ms)
        if self._shown_ms is not None:
            self._freeze = max(self._freeze or 0.0, now_ms - self._shown_ms)
        self._shown_ms = now_ms

    def audio_frame(self) -> None:
        self._audio += 1

    def snapshot(self, now_ms: float) -> dict:
        elapsed_ms = max(now_ms - self._since, 1.0)
        loss = 0.0
        if self._high is not None:
            low = self._low if self._low is not None else self._high
            base = self._top if self._top is not None else low - 1
            expected = self._high - base
            if expected > 0:
                loss = round(max(0, expected - self._packets) / expected, 3)
            self._top = max(base, self._high)
        def median(values: list[float]) -> float | None:
            if not values:
                return None
            ordered, middle = sorted(values), len(values) // 2
            return round(ordered[middle] if len(ordered) % 2
                         else (ordered[middle - 1] + ordered[middle]) / 2, 1)
        result = {"video_fps": round(self._shown * 1000 / elapsed_ms, 1),
                  "audio_frames": self._audio, "loss": loss,
                  "latency_ms": median(self._latencies), "delay_ms": median(self._delays),
                  "kbps": round(self._bytes * 8 / elapsed_ms, 1), "dropped": self._refused,
                  "freeze_ms": None if self._freeze is None else round(self._freeze)}
        self._since, self._high, self._low, self._freeze = now_ms, None, None, None
        self._packets = self._bytes = self._shown = self._audio = 0
        self._latencies, self._delays = [], []
        return result


class ReportMeter:
    """A receiver's half of rate control for one link: what its Reports say.

    `packet(seq, size_bytes, now_ms)` for every opened packet; `transit(capture_ms,
    wall_ms)` for every video fragment (capture_ms from its header, wall_ms our wall
    clock on arrival); `report(now_ms)` every REPORT_INTERVAL_MS returns the Report
    for the interval since the last: loss and kbps as LinkStats counts them (loss
    before any repair: a fragment sent again has a sequence number of its own), and
    delay_ms, this interval's median transit over the lowest transit of the last
    DELAY_BASE_MS, so the offset between the two ends' clocks cancels out. Nothing
    received: a Report of no loss and no delay.
    """

    def __init__(self, now_ms: float) -> None:
        self._stats = LinkStats(now_ms)
        self._transits: list[float] = []
        self._lows: collections.deque[tuple[float, float]] = collections.deque()
        # ^ (when, the lowest transit of one interval), for DELAY_BASE_MS

    def packet(self, seq: int, size_bytes: int, now_ms: float) -> None:
        self._stats.packet(seq, size_bytes, now_ms)

    def transit(self, capture_ms: float, wall_ms: float) -> None:
        if len(self._transits) < _MAX_LATENCY_SAMPLES:
            self._transits.append(wall_ms - capture_ms)

    def report(self, now_ms: float) -> Report:
        snapshot = self._stats.snapshot(now_ms)
        delay = 0
        if self._transits:
            ordered = sorted(self._transits)
            self._lows.append((now_ms, ordered[0]))
            while now_ms - self._lows[0][0] > DELAY_BASE_MS:
                self._lows.popleft()
            base = min(low for _, low in self._lows)
            delay = min(max(0, round(ordered[len(ordered) // 2] - base)), 0xFFFF)
            self._transits = []
        return Report(round(snapshot["loss"] * 10000), delay,
                      min(round(snapshot["kbps"]), 0xFFFFFFFF))


# --- Video out: retransmission and the rate ----------------------------------------------

class FragmentCache:
    """The data fragments of the last frames one video stream sent, kept for the
    Retransmitters of every link the stream goes to: at most max_frames frames and
    max_bytes, the oldest leaving first. Parity is not kept: a Nack names data.
    Not thread-safe: the sender guards it."""

    def __init__(self, max_frames: int = RESEND_FRAMES, max_bytes: int = RESEND_BYTES) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._frames: collections.OrderedDict[int, dict[int, bytes]] = collections.OrderedDict()
        self.held_bytes = 0

    def __contains__(self, frame_id: int) -> bool:
        return frame_id in self._frames

    def add(self, frame_id: int, inners: list[bytes]) -> None:
        """Keep frame_id's data fragments (inners from `fragment`)."""
        kept: dict[int, bytes] = {}
        for inner in inners:
            f = unpack_video(inner)
            if f is not None and not f.parity and f.frame_id == frame_id:
                kept[f.index] = bytes(inner)
        self._drop(frame_id)
        self._frames[frame_id] = kept
        self.held_bytes += sum(map(len, kept.values()))
        while len(self._frames) > self.max_frames or self.held_bytes > self.max_bytes:
            self._drop(next(iter(self._frames)))

    def get(self, frame_id: int, index: int) -> bytes | None:
        return self._frames.get(frame_id, {}).get(index)

    def indices(self, frame_id: int) -> list[int]:
        return sorted(self._frames.get(frame_id, {}))

    def _drop(self, frame_id: int) -> None:
        old = self._frames.pop(frame_id, None)
        if old is not None:
            self.held_bytes -= sum(map(len, old.values()))


class Retransmitter:
    """Answers one link's Nacks from its stream's FragmentCache, within bounds the peer
    can't stretch, whatever it asks: a fragment goes again at most once to this link
    and only while cached, at most `burst` at once and `per_s` a second (a token
    bucket), and one Nack makes us look up at most 17 x MAX_NACK_ENTRIES fragments.
    The rest of a Nack is dropped and counted. So a Nack never costs us more than we
    sent that peer in the first place.

    Counters: resent (fragments answered), refused (over the budget, or sent again
    before), unknown (not, or no longer, cached).
    """

    def __init__(self, cache: FragmentCache, per_s: float = RESEND_PER_S,
                 burst: int = RESEND_BURST) -> None:
        self.cache = cache
        self.per_s = per_s
        self.burst = burst
        self._tokens = float(burst)
        self._at: float | None = None       # when the bucket was last filled
        self._sent: set[tuple[int, int]] = set()    # (frame_id, index) sent again
        self.resent = self.refused = self.unknown = 0

    def answer(self, nack: Nack, now_ms: float) -> list[bytes]:
        """The video inner payloads to seal and send again, in the order asked."""
        if self._at is not None:
            self._tokens = min(self.burst,
                               self._tokens + max(0.0, now_ms - self._at) * self.per_s / 1000)
        self._at = now_ms
        out: list[bytes] = []
        lookups = 17 * MAX_NACK_ENTRIES
        for frame_id, index in nack.wanted():
            for i in self.cache.indices(frame_id) if index is None else [index]:
                lookups -= 1
                if lookups < 0:
                    self.refused += 1
                    break
                inner = self.cache.get(frame_id, i)
                if inner is None:
                    self.unknown += 1
                elif (frame_id, i) in self._sent or self._tokens < 1:
                    self.refused += 1
                else:
                    self._sent.add((frame_id, i))
                    self._tokens -= 1
                    out.append(inner)
        if len(self._sent) > 4 * RESEND_FRAMES * 17:
            self._sent = {key for key in self._sent if key[0] in self.cache}
        self.resent += len(out)
        return out


@dataclasses.dataclass(frozen=True)
class VideoSettings:
    """How a video stream is sent now, from RateController.update."""
    bitrate: int                    # the encoder's target, bits a second
    fps: int
    width: int
    height: int


class RateController:
    """How one video stream is sent (bitrate, frame rate, size), from the Reports of
    the links it goes to. One encoder serves them all, so the worst link decides.

    `report(peer, report, now_ms, sent_kbps)` for each Report, with what we sent that
    peer over about the interval it covers, if known; `forget(peer)` when a link ends;
    `update(now_ms)` (once per camera frame, say) returns the settings; `take_frame(
    now_ms)` says whether the frame captured now is sent, at the settings' rate.

    A link whose latest Report says loss above LOSS_HIGH_BP (and so does its loss
    smoothed over LOSS_SMOOTHING reports: a quarter second of 5% random loss often
    loses more than 10%, and that is no congestion) or delay above DELAY_HIGH_MS,
    or whose Reports stopped for REPORT_STALE_MS, is congested: the
    bitrate falls to RATE_DECREASE of itself, times the share of what we sent that
    arrived when less got there (whatever parity, headers and sound add, that share
    is what the link can take), once per Report that says so. When every link is
    clear (smoothed loss below LOSS_LOW_BP, delay below DELAY_LOW_MS) it grows
    RATE_INCREASE_PER_S a second, from INCREASE_AFTER_MS after the last decrease, up
    to max_bitrate; otherwise it holds.
    Links that never reported (a peer that doesn't) don't count.

    The bitrate comes out in steps of RATE_STEP (a new bitrate costs the encoder a
    keyframe), and RATE_LADDER turns it into a frame rate and a size: first the
    bitrate falls, then the frame rate, then the size. Going back up to a bigger
    size needs RATE_UP_MARGIN over its lowest rung and SIZE_HOLD_MS since the last
    size change. Counters: decreases, increases (of the bitrate step).
    """

    def __init__(self, max_bitrate: int, width: int, height: int, fps: int) -> None:
        self.max_bitrate = max_bitrate
        self.min_bitrate = max(1, round(max_bitrate * RATE_MIN_SHARE))
        self.full = (width, height)
        self.max_fps = fps
        self.estimate = float(max_bitrate)      # bits a second, before the steps
        self._reports: dict[str, tuple[Report, float, float | None, float]] = {}
        # ^ peer -> (latest Report, when, kb/s we sent them then, smoothed loss_bp)
        self._decreased_ms: float | None = None
        self._updated_ms: float | None = None
        self._resized_ms: float | None = None
        self._rung = 0
        self._next_frame_ms: float | None = None
        self.decreases = self.increases = 0
        self.settings = self._settings(None)

    def report(self, peer: str, report: Report, now_ms: float,
               sent_kbps: float | None = None) -> None:
        before = self._reports.get(peer)
        smooth = report.loss_bp if before is None else (
            before[3] + (report.loss_bp - before[3]) / LOSS_SMOOTHING)
        self._reports[peer] = (report, now_ms, sent_kbps, smooth)

    def forget(self, peer: str) -> None:
        self._reports.pop(peer, None)

    def update(self, now_ms: float) -> VideoSettings:
        congested, clear = [], True         # congested: the share of ours that arrived
        for report, at, sent, smooth in self._reports.values():
            stale = now_ms - at > REPORT_STALE_MS
            lossy = report.loss_bp > LOSS_HIGH_BP and smooth > LOSS_HIGH_BP
            if stale or lossy or report.delay_ms > DELAY_HIGH_MS:
                news = self._decreased_ms is None or at > self._decreased_ms or (
                    stale and now_ms - self._decreased_ms >= REPORT_STALE_MS)
                if news:
                    congested.append(1.0 if stale or not sent else min(1.0, report.kbps / sent))
            clear &= not stale and smooth < LOSS_LOW_BP and report.delay_ms < DELAY_LOW_MS
        before = self.settings.bitrate
        if congested:
            self.estimate = max(self.min_bitrate,
                                self.estimate * min(congested) * RATE_DECREASE)
            self._decreased_ms = now_ms
        elif clear and (self._decreased_ms is None
                        or now_ms - self._decreased_ms >= INCREASE_AFTER_MS):
            elapsed_s = min(1000.0, now_ms - (self._updated_ms or now_ms)) / 1000
            self.estimate = min(self.max_bitrate,
                                self.estimate * (1 + RATE_INCREASE_PER_S * elapsed_s))
        self._updated_ms = now_ms
        self.settings = self._settings(now_ms)
        self.decreases += self.settings.bitrate < before
        self.increases += self.settings.bitrate > before
        return self.settings

    def take_frame(self, now_ms: float) -> bool:
        """Send the frame captured now? Keeps settings.fps on average from a camera
        that gives more (a quarter of a frame's time early is on time)."""
        period = 1000 / self.settings.fps
        due = self._next_frame_ms
        if due is not None and now_ms < due - period / 4:
            return False
        start = due if due is not None and now_ms - due < period else now_ms
        self._next_frame_ms = start + period
        return True

    def _settings(self, now_ms: float | None) -> VideoSettings:
        steps = math.log(self.max_bitrate / self.estimate) / math.log(1 / RATE_STEP)
        bitrate = max(self.min_bitrate,
                      round(self.max_bitrate * RATE_STEP ** math.ceil(steps - 1e-9)))
        share = bitrate / self.max_bitrate
        rung = next(i for i, (least, _, _) in enumerate(RATE_LADDER) if share >= least)
        divisor, current = RATE_LADDER[rung][2], RATE_LADDER[self._rung][2]
        if divisor < current:       # a bigger picture: only with room, not too often
            lowest = max(i for i, r in enumerate(RATE_LADDER) if r[2] == divisor)
            if share < RATE_LADDER[lowest][0] * RATE_UP_MARGIN or (
                    now_ms is not None and self._resized_ms is not None
                    and now_ms - self._resized_ms < SIZE_HOLD_MS):
                rung = min(i for i, r in enumerate(RATE_LADDER) if r[2] == current)
        if RATE_LADDER[rung][2] != current:
            self._resized_ms = now_ms
        self._rung = rung
        _, fps, divisor = RATE_LADDER[rung]
        width, height = self.full
        return VideoSettings(bitrate, min(fps, self.max_fps),
                             max(2, width // divisor // 2 * 2), max(2, height // divisor // 2 * 2))


# =============================================================================
# 9. PLAYOUT: the jitter buffer and lip sync, on the playback clock
# =============================================================================
# Pure, like 5 and 6: when what came in is played. The jitter buffer turns
# audio packets that arrive unevenly into one frame every 20 ms, which
# Playout decodes, rebuilds from Opus FEC or conceals, and meters (how loud
# each voice is, for the window's speaking indicator); LipSync
# times each video frame against the sound captured with it, and holds the
# sound back when the picture can't keep up. The playback and decoding
# threads of CLIENT MEDIA call in with `now_ms`; no sockets, threads or
# clocks here.

# --- Audio: the jitter buffer -------------------------------------------------------------

class JitterState(enum.Enum):
    """Where a JitterBuffer is; it starts BUFFERING and returns there on an underrun."""
    BUFFERING = "buffering"         # waiting until target_ms of audio is buffered
    PLAYING = "playing"


REPAIR_HOLD_MS = 10_000            # a gap in the sequence keeps the repair delay this long


class JitterBuffer:
    """Smooths one incoming audio stream for a playback clock.

    `push` every received frame (seq only rises for the life of the stream: a new
    stream needs a new buffer); call `pop` once per frame_ms. pop returns ("frame",
    payload) for the next frame in order; ("lost", None) when that frame is missing
    but later ones are here (run the codec's loss concealment); with fec=True, a
    missing frame whose successor is here is ("fec", the successor's payload)
    instead: Opus rebuilds the lost frame from the FEC data it carries, and the
    successor stays for its own turn. ("empty", None) while buffering: at the
    start, and after an underrun until target_ms is buffered again (play
    concealment or silence). A gap of `capacity` frames or more is skipped, not
    concealed. `concealed` counts the missing frames, `recovered` those of them
    given as "fec".

    The target delay is 2 x the RFC 3550 inter-arrival jitter plus one frame, rounded
    up to whole frames and kept within [min_delay_ms, max_delay_ms]; plus
    `repair_frames` (within max_delay_ms) for `repair_hold_ms` after a gap in the
    sequence numbers pushed: FEC needs the packet after a lost one to be here when
    the lost one is due, and at one frame of delay it never is. The larger target
    takes effect at the next underrun, which a loss at one frame of delay is.
    Duplicates and
    frames behind the playout point are dropped (counted duplicates, late). Holding
    more than target + 2 frames for _CATCH_UP_AFTER_MS drops the oldest, one per pop,
    to cut the delay; past `capacity` the oldest goes at once (both counted dropped).
    """

    def __init__(self, frame_ms: int = 20, min_delay_ms: int = 20, max_delay_ms: int = 80,
                 capacity: int = 50, repair_frames: int = 0,
                 repair_hold_ms: float = REPAIR_HOLD_MS) -> None:
        if frame_ms <= 0 or not 0 <= min_delay_ms <= max_delay_ms or capacity < 1:
            raise ValueError("need frame_ms > 0, 0 <= min_delay_ms <= max_delay_ms, capacity > 0")
        self.frame_ms = frame_ms
        self.capacity = capacity
        self._min_frames = max(1, math.ceil(min_delay_ms / frame_ms))
        self._max_frames = max(self._min_frames, max_delay_ms // frame_ms)
        self._max_jitter_ms = max(max_delay_ms, frame_ms)   # one outlier moves jitter this much
        self._target_frames = self._min_frames
        self.repair_frames = repair_frames
        self.repair_hold_ms = repair_hold_ms
        self._highest: int | None = None        # highest seq pushed
        self._repair_until_ms = -math.inf       # arrival time the repair delay lasts to
        self.state = JitterState.BUFFERING
        self._frames: dict[int, bytes] = {}     # seq -> payload
        self._next: int | None = None           # seq to play next; None until the first play
        self._last_transit: float | None = None  # arrival - send time of the last push
        self.jitter_ms = 0.0
        self._over_pops = 0         # pops in a row that found more than target + 2 frames
        self.played = self.concealed = self.late = self.dropped = 0
        self.duplicates = self.underruns = self.recovered = 0

    @property
    def target_ms(self) -> int:
        return self._target_frames * self.frame_ms

    @property
    def depth(self) -> int:
        return len(self._frames)

    @property
    def last_seq(self) -> int | None:
        """The seq the last pop that wasn't "empty" gave or concealed (None before)."""
        return None if self._next is None else self._next - 1

    def push(self, seq: int, payload: bytes, arrival_ms: float) -> None:
        transit = arrival_ms - seq * self.frame_ms      # send time = seq * frame_ms + offset
        if self._last_transit is not None:
            d = min(abs(transit - self._last_transit), self._max_jitter_ms)
            self.jitter_ms += (d - self.jitter_ms) / 16     # RFC 3550, A.8
        self._last_transit = transit
        if self._highest is not None and seq > self._highest + 1:
            self._repair_until_ms = arrival_ms + self.repair_hold_ms
        self._highest = seq if self._highest is None else max(self._highest, seq)
        # A millisecond of jitter is timer noise: else a LAN's tiny jitter costs a frame.
        wanted = 1 + math.ceil(max(0.0, 2 * self.jitter_ms - 1) / self.frame_ms)
        repair = self.repair_frames if arrival_ms < self._repair_until_ms else 0
        self._target_frames = min(max(wanted, self._min_frames) + repair, self._max_frames)
        if self._next is not None and seq < self._next:
            self.late += 1
        elif seq in self._frames:
            self.duplicates += 1
        else:
            self._frames[seq] = payload
            if len(self._frames) > self.capacity:
                self._drop_oldest()

    def pop(self, fec: bool = False) -> tuple[str, bytes | None]:
        if not self._frames:
            self.state = JitterState.BUFFERING
            self.underruns += 1
            return ("empty", None)
        if self.state is JitterState.BUFFERING:
            low = min(self._frames)
            if max(self._frames) - low + 1 < self._target_frames:
                self.underruns += 1
                return ("empty", None)
            self.state, self._next = JitterState.PLAYING, low
        if len(self._frames) > self._target_frames + 2:
            self._over_pops += 1
            if self._over_pops * self.frame_ms >= _CATCH_UP_AFTER_MS:
                self._drop_oldest()
        else:
            self._over_pops = 0
        next_seq = self._next if self._next is not None else min(self._frames)
        if next_seq not in self._frames and min(self._frames) - next_seq >= self.capacity:
            next_seq = min(self._frames)    # a jump this big is a resync, not a loss
        payload = self._frames.pop(next_seq, None)
        self._next = next_seq + 1
        if payload is None:
            self.concealed += 1
            successor = self._frames.get(next_seq + 1) if fec else None
            if successor is not None:
                self.recovered += 1
                return ("fec", successor)
            return ("lost", None)
        self.played += 1
        return ("frame", payload)

    def _drop_oldest(self) -> None:
        oldest = min(self._frames)
        del self._frames[oldest]
        self.dropped += 1
        if self._next is not None:
            self._next = max(self._next, oldest + 1)


# --- Audio: playout and levels ----------------------------------------------------------
# What one peer's voice plays next, and how loud each voice is for the window's
# speaking indicator. Samples are int16 in the machine's byte order (little-endian
# on every system we build for), as SOUND DEVICES hands them over.

PLAYOUT_FADE_FRAMES = 5             # nothing buffered: conceal this many frames, then silence
LEVEL_WINDOW_FRAMES = 10            # a level is the last 200 ms
LEVEL_FLOOR_DBFS = -90.0            # the level of silence (JSON has no -inf)
SPEAKING_DBFS = -45.0               # a voice above this is "speaking" (noise suppressed: ~-70)
_LEVEL_STRIDE = 4                   # a level reads every 4th sample: 20 us, not 90, in Python


class VoiceDecoder(Protocol):
    """What Playout needs of a decoder: SOUND DEVICES' OpusDecoder and PcmCodec."""
    def decode(self, data: bytes) -> bytes: ...
    def conceal(self) -> bytes: ...
    def decode_fec(self, next_packet: bytes) -> bytes: ...


class LevelMeter:
    """How loud one voice is. add() every 20 ms frame played or sent; `dbfs` is
    then the level of the last `window_frames`: RMS in dB against a full-scale
    sine (a sine of peak amplitude 10^(L/20) x 32767 reads L), LEVEL_FLOOR_DBFS
    at most for silence. One writer thread; reading `dbfs` is safe from any
    thread (one float, replaced whole)."""

    def __init__(self, window_frames: int = LEVEL_WINDOW_FRAMES) -> None:
        self._powers: collections.deque[float] = collections.deque(maxlen=window_frames)
        self.dbfs = LEVEL_FLOOR_DBFS

    def add(self, pcm: bytes) -> float:
        """Meter one frame; returns the new `dbfs`."""
        samples = memoryview(pcm[:len(pcm) // 2 * 2]).cast("h")[::_LEVEL_STRIDE]
        self._powers.append(sum(x * x for x in samples) / max(1, len(samples)))
        power = sum(self._powers) / len(self._powers) / (32767 ** 2 / 2)
        self.dbfs = max(LEVEL_FLOOR_DBFS, 10 * math.log10(power)) if power > 0 \
            else LEVEL_FLOOR_DBFS
        return self.dbfs


class Playout:
    """One peer's voice for the playback clock: `render` turns what
    JitterBuffer.pop(fec=True) gave into the frame to play, through that
    peer's decoder, and meters it (`meter`).

    "frame" is decoded; "fec" rebuilds the lost frame from the FEC data of the
    packet after it (decoded again on its own turn: that is how libopus wants
    it); "lost" is concealed. "empty" (nothing buffered: the peer is muted,
    or an underrun) is concealed for `fade_frames` after the last voice, so
    a voice that stops fades instead of clicking, and is `silence` after.
    Not thread-safe: one sink thread renders.
    """

    def __init__(self, silence: bytes, fade_frames: int = PLAYOUT_FADE_FRAMES) -> None:
        self.silence = silence
        self.fade_frames = fade_frames
        self.meter = LevelMeter()
        self._quiet = fade_frames           # frames rendered since the last voice

    def render(self, status: str, payload: bytes | None, decoder: VoiceDecoder) -> bytes:
        if status == "frame" and payload is not None:
            pcm, self._quiet = decoder.decode(payload), 0
        elif status == "fec" and payload is not None:
            pcm, self._quiet = decoder.decode_fec(payload), 0
        elif status == "lost" or self._quiet < self.fade_frames:
            pcm, self._quiet = decoder.conceal(), self._quiet + 1
        else:
            pcm = self.silence
        self.meter.add(pcm)
        return pcm


# --- Lip sync ----------------------------------------------------------------------------

AV_AHEAD_MS = 45                    # sound at most this far ahead of its picture (BT.1359)
AV_BEHIND_MS = 125                  # and at most this far behind it
AV_LATE_OK_MS = 20                  # video later than its sound by this: hold the sound back
AV_MAX_HOLD_MS = 500                # a video frame waits at most this long for its sound
AV_MAX_AUDIO_DELAY_MS = 400         # sound waits at most this long for its late picture
AV_ADJUST_MS = 500                  # the sound's delay changes at most this often
AV_AUDIO_STALE_MS = 500             # no sound played for this long: video shows at once
_AV_CAPTURES = 256                  # capture times kept of the audio frames last arrived


class LipSync:
    """Plays one peer's video in step with its voice, from the capture times both
    carry (their clock) and `now_ms` (ours, monotonic: only differences count).

    The voice sets the clock: `audio_arrived(seq, capture_ms)` for every audio frame
    pushed into the jitter buffer, `audio_played(seq, now_ms)` when the playback
    thread plays (or conceals) it; the offset between their capture clock and our
    playout is then known. A video frame captured at c is due at c + offset, with
    the sound captured with it: `video_due(capture_ms, now_ms)`, when the frame is
    complete, says when to show it (now if its sound has played already or no sound
    plays; at most AV_MAX_HOLD_MS from now), and `video_shown(capture_ms, now_ms)`
    measures the skew when it is shown; `skew()` gives the median since the last
    call (None: no frame shown against sound).

    Skew = when a frame is shown - when the sound captured with it played: positive,
    the sound came first (audio ahead of video); negative, after (audio behind).
    ITU-R BT.1359 puts the edges people notice at +45 and -125 ms. Video that comes
    later than its sound can't be shown earlier, so then the sound is held back:
    every popped audio frame goes through `delay_audio` on its way to the decoder,
    which keeps `audio_delay_ms` (whole frames, at most AV_MAX_AUDIO_DELAY_MS); a
    longer delay plays a gap ("empty"), a shorter one drops the oldest frames. At
    most every AV_ADJUST_MS, once the last change has taken effect, the delay grows
    by the 90th percentile of how late the video came after its sound (if over
    AV_LATE_OK_MS), or shrinks by how early the latest of it came (every frame a
    frame's time early or more). Not thread-safe: the link's lock guards it.
    """

    def __init__(self, frame_ms: int = 20) -> None:
        self.frame_ms = frame_ms
        self.audio_delay_ms = 0
        self._captures: collections.OrderedDict[int, float] = collections.OrderedDict()
        self._offset: float | None = None   # our playout clock - their capture clock
        self._played_ms = -math.inf         # when sound last played
        self._line: collections.deque[tuple[str, bytes | None, int | None]] = \
            collections.deque()             # audio frames held back
        self._late: list[float] = []        # video: arrival - due, since the last change
        self._adjusted_ms: float | None = None
        self._skews: list[float] = []

    def audio_arrived(self, seq: int, capture_ms: float) -> None:
        self._captures[seq] = capture_ms
        if len(self._captures) > _AV_CAPTURES:
            self._captures.popitem(last=False)

    def audio_played(self, seq: int | None, now_ms: float) -> None:
        capture = self._captures.get(seq) if seq is not None else None
        if capture is None:
            return
        offset = now_ms - capture
        # A playback thread's 20 ms ticks wobble by a few ms: smooth them, but
        # follow a step (a new delay, a resync) at once.
        if self._offset is None or abs(offset - self._offset) > 3 * self.frame_ms:
            self._offset = offset
        else:
            self._offset += (offset - self._offset) / 8
        self._played_ms = now_ms

    def _sounding(self, now_ms: float) -> bool:
        return self._offset is not None and now_ms - self._played_ms <= AV_AUDIO_STALE_MS

    def video_due(self, capture_ms: float, now_ms: float) -> float:
        if not self._sounding(now_ms) or self._offset is None:
            return now_ms
        due = capture_ms + self._offset
        if len(self._late) < _MAX_LATENCY_SAMPLES:
            self._late.append(now_ms - due)
        self._adjust(now_ms)
        return min(max(due, now_ms), now_ms + AV_MAX_HOLD_MS)

    def video_shown(self, capture_ms: float, now_ms: float) -> None:
        if self._sounding(now_ms) and self._offset is not None \
                and len(self._skews) < _MAX_LATENCY_SAMPLES:
            self._skews.append(now_ms - (capture_ms + self._offset))

    def skew(self) -> float | None:
        skews, self._skews = sorted(self._skews), []
        return round(skews[len(skews) // 2], 1) if skews else None

    def delay_audio(self, status: str, payload: bytes | None,
                    seq: int | None) -> tuple[str, bytes | None, int | None]:
        """What to play now for what the jitter buffer popped: (status, payload, seq),
        maybe an earlier frame's, or ("empty", None, None) while the delay grows."""
        frames = self.audio_delay_ms // self.frame_ms
        self._line.append((status, payload, seq))
        if len(self._line) <= frames:
            return ("empty", None, None)
        while len(self._line) > frames + 1:
            self._line.popleft()
        return self._line.popleft()

    def _adjust(self, now_ms: float) -> None:
        if self._adjusted_ms is None:
            self._adjusted_ms = now_ms
        if now_ms - self._adjusted_ms < AV_ADJUST_MS:
            return
        if len(self._line) != self.audio_delay_ms // self.frame_ms:
            self._late = []                 # the last change is still under way
            return
        late, self._late = sorted(self._late), []
        self._adjusted_ms = now_ms
        if not late:
            return
        worst = late[min(len(late) - 1, len(late) * 9 // 10)]
        delay = self.audio_delay_ms
        if worst > AV_LATE_OK_MS:
            delay += math.ceil(worst / self.frame_ms) * self.frame_ms
        elif late[-1] < -self.frame_ms and delay > 0:
            delay -= math.floor(-late[-1] / self.frame_ms) * self.frame_ms
        self.audio_delay_ms = min(max(0, delay), AV_MAX_AUDIO_DELAY_MS)


# =============================================================================
# 10. DISCOVERY: advertise a host and browse for hosts with mDNS (zeroconf)
# =============================================================================
# A host registers one `_chatroom._tcp.local.` service whose TXT record says
# the protocol version (`v`), the host's name (`n`), how many rooms are open
# (`rc`), the fingerprint of its TLS key (`fp`, 64 hex digits; none on a
# host run with --insecure) and, while they fit in a single packet, each
# room with its member count (`r0`, `r1`, ... = "3 lobby"). The record is
# updated, at most every `advertise_debounce_s`, as rooms come and go, and
# withdrawn when the host stops. Browsing asks multicast (QM) questions:
# about 150 ms to find a host on these machines, against about 1.1 s with
# zeroconf's default question.
#
# Everything read from the LAN is untrusted: TXT values are decoded and
# checked like wire fields, and a malformed record is skipped, not trusted.
# zeroconf is imported here, inside functions, so `import chatroom` works
# without it. `interface` (the --interface flag) restricts mDNS to one
# address; tests always pass 127.0.0.1. A host advertises every address it
# has; the browser orders a host's addresses, likeliest first, and the
# client tries them all (CONNECTIONS' connect_first).

TXT_BUDGET_BYTES = 900              # keeps the record inside one mDNS packet


@dataclasses.dataclass(frozen=True)
class HostInfo:
    """One host seen on the LAN."""
    name: str
    address: str                    # the best of `addresses`
    port: int
    rooms: tuple[tuple[str, int], ...]
    version: int
    rooms_total: int = 0            # rooms open, listed or not
    key: str = ""                   # the mDNS service name, unique on the LAN
    addresses: tuple[str, ...] = ()     # every address it advertised, best first
    fingerprint: str = ""           # its TLS key's, as advertised ("": --insecure)

    def to_event(self) -> dict:
        """The `host` event of the client vocabulary."""
        return {"type": "host", "name": self.name, "address": self.address,
                "addresses": list(self.addresses or (self.address,)),
                "port": self.port, "version": self.version,
                "rooms": [{"room": r, "members": n} for r, n in self.rooms],
                "rooms_total": self.rooms_total, "fingerprint": self.fingerprint}


def order_addresses(addresses: Iterable[str], local: Iterable[Any]) -> list[str]:
    """A host's advertised addresses, the likeliest to answer first: those
    on one of our `local` networks (ipaddress networks), then the rest;
    IPv4 before IPv6, link-local last; otherwise as advertised. Text that
    isn't an address is dropped (it came from the LAN)."""
    networks = list(local)
    parsed = []
    for index, text in enumerate(dict.fromkeys(addresses)):
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        on_ours = any(address.version == n.version and address in n for n in networks)
        parsed.append(((not on_ours, address.is_link_local, address.version, index), text))
    return [text for _key, text in sorted(parsed)]


def encode_txt(name: str, rooms: list[tuple[str, int]],
               fingerprint: str = "") -> dict[str, str]:
    """TXT properties for a host; rooms beyond the budget are only counted."""
    props = {"v": str(PROTOCOL_VERSION), "n": name[:63], "rc": str(len(rooms))}
    if fingerprint:
        props["fp"] = fingerprint
    used = sum(len(k) + len(v.encode()) + 2 for k, v in props.items())
    for index, (room, count) in enumerate(rooms):
        key, value = f"r{index}", f"{count} {room}"
        cost = len(key) + len(value.encode()) + 2
        if used + cost > TXT_BUDGET_BYTES:
            break
        props[key] = value
        used += cost
    return props


def decode_txt(props: dict[bytes, bytes | None]) -> tuple[str, int, list, int] | None:
    """(name, version, rooms, rooms_total) from TXT properties, or None if the
    record is not a well-formed chatroom record."""
    text = {}
    for key, value in props.items():
        try:
            text[key.decode("utf-8")] = (value or b"").decode("utf-8")
        except (UnicodeDecodeError, AttributeError):
            return None
    try:
        version = FIELD_RULES["version"](int(text.get("v", "")))
        name = FIELD_RULES["host"](text.get("n", ""))
        total = int(text.get("rc", "0"))
    except ValueError:
        return None
    rooms = []
    for index in range(min(total, MAX_ROOMS_LISTED)):
        count, _, room = text.get(f"r{index}", "").partition(" ")
        if not (count.isascii() and count.isdecimal()) or not room \
                or len(room) > 4 * MAX_ID_CHARS:
            break
        rooms.append((room, int(count)))
    return printable(name), version, rooms, max(total, len(rooms))


def txt_fingerprint(props: dict[bytes, bytes | None]) -> str:
    """The key fingerprint a TXT record advertises, or "" (none, or not
    64 hex digits: a record is untrusted)."""
    value = props.get(b"fp") or b""
    return value.decode("ascii").upper() if re.fullmatch(rb"[0-9A-Fa-f]{64}", value) else ""


def _zeroconf():
    """zeroconf's names we use, or MissingPackage."""
    try:
        import zeroconf
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf
    except ImportError:
        raise MissingPackage("zeroconf", "LAN discovery") from None
    return zeroconf, AsyncZeroconf, AsyncServiceBrowser, AsyncServiceInfo


def _open_zeroconf(interface: str | None):
    """An AsyncZeroconf on one interface address, or on every interface."""
    zeroconf, AsyncZeroconf, _, _ = _zeroconf()
    if interface is None:
        return AsyncZeroconf(interfaces=zeroconf.InterfaceChoice.All,
                             ip_version=zeroconf.IPVersion.V4Only)
    version = ipaddress.ip_address(interface).version
    return AsyncZeroconf(interfaces=[interface], ip_version=(
        zeroconf.IPVersion.V4Only if version == 4 else zeroconf.IPVersion.V6Only))


def _interface_addresses() -> list[tuple[str, int]]:
    """(address, prefix length) of every address of this machine."""
    try:
        import ifaddr  # a dependency of zeroconf
    except ImportError:
        raise MissingPackage("zeroconf", "LAN discovery") from None
    return [(ip.ip if isinstance(ip.ip, str) else ip.ip[0], ip.network_prefix)
            for adapter in ifaddr.get_adapters() for ip in adapter.ips]


def lan_addresses() -> list[str]:
    """What a host advertises: this machine's IPv4 addresses and its IPv6
    ones that work without a scope (not fe80::), loopback last."""
    found = {address for address, _prefix in _interface_addresses()
             if not ipaddress.ip_address(address).is_link_local}
    return sorted(found, key=lambda a: (ipaddress.ip_address(a).is_loopback,
                                        ":" in a, a))


def browsed_interfaces(interface: str | None) -> list[str]:
    """Where mDNS looks, in words ("eth0 (192.168.1.7)"): the --interface
    address, or every interface with an IPv4 address but loopback."""
    try:
        import ifaddr
        adapters = ifaddr.get_adapters()
    except ImportError:
        return [interface] if interface else []
    named = [f"{adapter.nice_name} ({ip.ip})" for adapter in adapters for ip in adapter.ips
             if isinstance(ip.ip, str) and (ip.ip == interface if interface
                                            else not ip.ip.startswith("127."))]
    return named or ([interface] if interface else [])


def local_networks() -> list[Any]:
    """The networks this machine is on (ipaddress networks), for
    order_addresses; [] when they can't be read."""
    networks = []
    try:
        for address, prefix in _interface_addresses():
            networks.append(ipaddress.ip_network(f"{address}/{prefix}", strict=False))
    except (MissingPackage, ValueError):
        pass
    return networks


class Advertiser:
    """Keeps one host registered on mDNS, its TXT record current."""

    def __init__(self, name: str, port: int, interface: str | None = None,
                 debounce_s: float = ADVERTISE_DEBOUNCE_S, fingerprint: str = "") -> None:
        self.name = name
        self.port = port
        self.fingerprint = fingerprint  # of the host's TLS key ("": plain TCP)
        self.interface = interface
        self.debounce_s = debounce_s    # one TXT update per burst of room changes
        self._azc: Any = None           # AsyncZeroconf, once started
        self._info: Any = None          # the registered ServiceInfo
        self._rooms: list[tuple[str, int]] = []
        self._update_task: asyncio.Task | None = None
        self._server = f"chatroom-{secrets.token_hex(4)}.local."   # our A record

    async def start(self) -> None:
        """Register; returns once probing and announcing are done (~1.6 s)."""
        self._azc = _open_zeroconf(self.interface)
        self._info = self._make_info(f"{self._instance()} ({self.port}).{SERVICE_TYPE}")
        announced = await self._azc.async_register_service(self._info,
                                                           allow_name_change=True)
        await announced
        self._info = self._make_info(self._info.name)   # the name may have changed

    def _instance(self) -> str:
        return re.sub(r"[.\x00-\x1f]", "_", self.name)[:40] or "chatroom"

    def _make_info(self, service_name: str):
        _, _, _, AsyncServiceInfo = _zeroconf()
        addresses = [self.interface] if self.interface else [
            a for a in lan_addresses() if not ipaddress.ip_address(a).is_loopback] \
            or ["127.0.0.1"]
        return AsyncServiceInfo(
            SERVICE_TYPE, service_name, port=self.port, parsed_addresses=addresses,
            properties=encode_txt(self.name, self._rooms, self.fingerprint),
            server=self._server)

    def rooms_changed(self, rooms: list[tuple[str, int]]) -> None:
        """Note the rooms now open; the TXT record follows within a moment."""
        self._rooms = rooms
        if self._azc is not None and self._update_task is None:
            self._update_task = asyncio.get_running_loop().create_task(
                self._update_soon(), name="mdns:update")

    async def _update_soon(self) -> None:
        try:
            await asyncio.sleep(self.debounce_s)
        finally:
            self._update_task = None
        if self._azc is None:
            return
        self._info = self._make_info(self._info.name)
        try:
            await self._azc.async_update_service(self._info)
        except Exception:                   # a flaky LAN must not stop the host
            log.warning("mDNS update failed", exc_info=True)

    async def close(self) -> None:
        """Withdraw the record (goodbye packets) and stop. Safe to call twice."""
        azc, self._azc = self._azc, None
        if self._update_task is not None:
            self._update_task.cancel()
        if azc is None:
            return
        try:
            await (await azc.async_unregister_service(self._info))
        except Exception:
            log.warning("mDNS goodbye failed", exc_info=True)
        finally:
            await azc.async_close()


class HostBrowser:
    """Watches the LAN for hosts; `hosts` is always the current view.

    `on_change(hosts)` runs on the event loop after each addition, update or
    removal, with a fresh list sorted by name.
    """

    def __init__(self, interface: str | None = None,
                 on_change: Callable[[list[HostInfo]], None] | None = None,
                 question_type: str = "QM",
                 resolve_timeout_s: float = RESOLVE_TIMEOUT_S,
                 on_resolved: Callable[[], None] | None = None) -> None:
        self.interface = interface
        self.on_change = on_change
        self.on_resolved = on_resolved      # after every resolve, found or not
        self.question_type = question_type  # "QM" (fast) or "default" (bench)
        self.resolve_timeout_s = resolve_timeout_s
        self.hosts: dict[str, HostInfo] = {}
        self._azc: Any = None
        self._browser: Any = None
        self._question: Any = None          # the DNSQuestionType asked
        self._resolving: dict[str, asyncio.Task] = {}   # the newest resolve per name

    async def start(self) -> None:
        zeroconf, _, AsyncServiceBrowser, _ = _zeroconf()
        self._azc = _open_zeroconf(self.interface)
        question = (zeroconf.DNSQuestionType.QM if self.question_type == "QM" else None)
        self._question = question
        self._browser = AsyncServiceBrowser(
            self._azc.zeroconf, SERVICE_TYPE, handlers=[self._on_service],
            question_type=question)

    def _on_service(self, zeroconf: Any, service_type: str, name: str,
                    state_change: Any) -> None:
        # One resolve per name at a time: two racing resolves could finish out
        # of order and leave an older TXT record (fewer rooms) in `hosts`.
        earlier = self._resolving.pop(name, None)
        if earlier is not None:
            earlier.cancel()
        if state_change.name == "Removed":
            if self.hosts.pop(name, None) is not None:
                self._changed()
            return
        task = asyncio.get_running_loop().create_task(self._resolve(name),
                                                      name=f"mdns:resolve:{name}")
        self._resolving[name] = task
        log_failure(task, f"resolving {name}")
        task.add_done_callback(lambda done: self._resolve_done(name, done))

    def _resolve_done(self, name: str, task: asyncio.Task) -> None:
        if self._resolving.get(name) is task:
            del self._resolving[name]
        if self.on_resolved is not None:
            self.on_resolved()

    @property
    def resolving(self) -> bool:
        """Is a host seen on the LAN still being resolved?"""
        return bool(self._resolving)

    async def _resolve(self, name: str) -> None:
        _, _, _, AsyncServiceInfo = _zeroconf()
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._azc.zeroconf,
                                        round(1000 * self.resolve_timeout_s),
                                        question_type=self._question):
            return
        decoded = decode_txt(info.properties or {})
        addresses = order_addresses(info.parsed_addresses(), local_networks())
        if decoded is None or not addresses or not info.port:
            return
        host_name, version, rooms, total = decoded
        if self.interface and ipaddress.ip_address(self.interface).is_loopback:
            # Browsing on loopback (tests): a host on this machine; never
            # reach past it, even if a record names other addresses.
            addresses = [a for a in addresses if ipaddress.ip_address(a).is_loopback]
            if not addresses:
                return
        self.hosts[name] = HostInfo(host_name, addresses[0], info.port,
                                    tuple(rooms), version, total, name, tuple(addresses),
                                    txt_fingerprint(info.properties or {}))
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.sorted_hosts())

    def sorted_hosts(self) -> list[HostInfo]:
        return sorted(self.hosts.values(), key=lambda h: (id_key(h.name), h.address, h.port))

    async def close(self) -> None:
        for task in list(self._resolving.values()):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._azc is not None:
            await self._azc.async_close()
            self._azc = None


async def discover(timeout: float = DISCOVERY_TIMEOUT_S, *, interface: str | None = None,
                   settle: float | None = None, name: str | None = None) -> list[HostInfo]:
    """The hosts found within `timeout` seconds, sorted by name.

    With `settle`, stop early once a host has been found, no host is still
    being resolved, and nothing new has appeared for `settle` seconds, or
    for as long as the first host took to appear, if longer: on a busy
    machine or network the others answer as slowly as the first. With
    `name`, keep only hosts of that name (compared like IDs).
    """
    changed = asyncio.Event()
    browser = HostBrowser(interface, on_change=lambda hosts: changed.set(),
                          on_resolved=changed.set)
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + timeout
    first_found: float | None = None        # seconds the first host took

    def wanted() -> list[HostInfo]:
        return [h for h in browser.sorted_hosts()
                if name is None or id_key(h.name) == id_key(name)]

    def settled() -> bool:
        return settle is not None and first_found is not None and not browser.resolving

    await browser.start()
    try:
        while (left := deadline - loop.time()) > 0:
            if first_found is None and wanted():
                first_found = loop.time() - started
            quiet = max(settle or 0.0, first_found or 0.0)
            changed.clear()
            try:
                await asyncio.wait_for(changed.wait(), min(left, quiet) if settled() else left)
            except TimeoutError:
                if settled():
                    break
        return wanted()
    finally:
        await browser.close()


# =============================================================================
# 11. VIDEO DEVICES: test pattern, cameras and files, VP8 and JPEG
# =============================================================================
# What a call needs below the network for pictures: frames from a camera, a
# video file (looped) or a test pattern stamped with a frame counter that
# survives lossy codecs; VP8 (PyAV, libvpx) or JPEG (OpenCV) to shrink them.
# Frames are numpy uint8 BGR arrays, 480 rows x 640 columns x 3. Threads
# call this section; it starts none (a source paces reads on a monotonic
# schedule). Every optional package is imported inside the function that
# uses it, and a missing one becomes a DeviceError that names it.
# Every number a maintainer may want to change, then the one error class and
# the helpers that turn a missing package into that error.

VIDEO_WIDTH = 640
VIDEO_HEIGHT = 480
VIDEO_FPS = 30
VIDEO_BITRATE = 1_000_000           # VP8 target, bits per second
VP8_KEYFRAME_FRAMES = 60            # a keyframe at least this often (2 s at 30 fps)
VP8_THREADS = 1                     # encoder threads (see Vp8Encoder)
VP8_CPU_USED = 8                    # libvpx speed: MEDIA-NOTES measured 5 ms, 33 dB here
JPEG_QUALITY = 70
JPEG_BITRATE = 8_000_000            # about what quality 70 takes at 640x480, 30 fps
JPEG_MIN_QUALITY = 20               # a bitrate never takes JPEG below this quality
JPEG_QUALITY_STEP = 5
MAX_DECODE_PIXELS = 1920 * 1088     # a peer's frame header claiming more is refused
CAMERA_PROBE_INDEXES = range(5)     # list_devices tries these camera indexes

SAMPLE_RATE = 48_000
FRAME_S = 0.020                     # one audio frame
FRAME_SAMPLES = 960                 # samples in one frame (mono)
FRAME_BYTES = 2 * FRAME_SAMPLES     # int16
SILENCE = bytes(FRAME_BYTES)
OPUS_BITRATE = 24_000               # bits per second; 24-32 k all sound alike for voice
OPUS_LOSS_PERCENT = 10              # tells the encoder how much FEC to carry
OPUS_MAX_PACKET_BYTES = 4000        # libopus's recommended output buffer
PCM_RATIO = 3                       # 48 kHz -> 16 kHz on the wire
TONE_HZ = 440.0
TONE_DBFS = -12.0
AUDIO_BURST_FRAMES = 4              # a device may deliver this many frames early
CLOCK_CATCH_UP_FRAMES = 5           # a late clock thread makes up at most this many
STOP_TIMEOUT_S = 2.0                # waiting for a media thread to end

RECORD_PNG_INTERVAL_S = 1.0         # at most one picture per peer this often
RECORD_FLUSH_S = 1.0                # a killed process loses at most this much sound

class DeviceError(ChatError):
    """A device or codec can't be used. `code` is for machines: "no_camera",
    "no_audio_device", or "missing_package" when a codec's package is absent;
    `message` is a sentence for a person. (ChatError refuses any code that
    ERROR_CODES doesn't list.)"""


def _numpy(code: str = "missing_package"):
    try:
        import numpy as np
    except ImportError:
        raise DeviceError(code, "media needs numpy: pip install numpy") from None
    return np


def _cv2(code: str = "missing_package"):
    # OpenCV reads OPENCV_LOG_LEVEL when it loads; without it, probing a
    # camera index that doesn't exist prints V4L warnings on every try.
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    try:
        import cv2
    except ImportError:
        raise DeviceError(code, "video needs OpenCV: pip install opencv-python-headless") \
            from None
    return cv2


def _av():
    try:
        import av
    except ImportError:
        raise DeviceError("missing_package", "VP8 needs PyAV: pip install av") from None
    return av


def _pyaudio():
    try:
        import pyaudio
    except ImportError:
        raise DeviceError("no_audio_device", "sound devices need PyAudio: pip install PyAudio") \
            from None
    return pyaudio


_STDERR_LOCK = threading.Lock()     # two threads swapping fd 2 at once would lose it


@contextlib.contextmanager
def _quiet_stderr():
    """Point fd 2 at /dev/null for the block. PortAudio's ALSA and JACK probes
    print dozens of lines there from C, past any Python setting; output from
    other threads during the block is lost too, so keep blocks short."""
    with _STDERR_LOCK:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (AttributeError, OSError, ValueError):   # no fd 2 (pythonw): nothing to hide
            saved = None
        if saved is None:
            yield
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)


class _Schedule:
    """Deadlines every `period_s` on the monotonic clock, so a loop keeps its
    rate without the drift of sleep(period). A caller more than `catch_up`
    periods late starts a new schedule instead of bursting to make up."""

    def __init__(self, period_s: float, catch_up: int = 0) -> None:
        self.period_s = period_s
        self.catch_up = catch_up
        self._next_s: float | None = None  # monotonic time of the next slot

    def wait_s(self) -> float:
        """Seconds to wait for the next slot (0 = due now); claims that slot."""
        now = time.monotonic()
        if self._next_s is None or now - self._next_s > (self.catch_up + 1) * self.period_s:
            self._next_s = now
        wait = max(0.0, self._next_s - now)
        self._next_s += self.period_s
        return wait


# --- The test pattern: a frame counter that survives codecs ------------------
# Stands in for a camera in tests and demos. The counter is 24 bits drawn as
# one row of black and white squares, cell = width // 40 pixels (16 at 640),
# placed on the 16-pixel macroblock grid on a grey band so that VP8 at 1 Mb/s
# and JPEG at quality 60 keep every square's colour. Layout, left to right:
# 4 guard cells (W B W B), 24 counter bits (most significant first), 4
# check bits (XOR of the counter's six nibbles), 4 guard cells (B W W B).

_GUARD_START = (1, 0, 1, 0)
_GUARD_END = (0, 1, 1, 0)
_STAMP_BITS = 24
_STAMP_CELLS = len(_GUARD_START) + _STAMP_BITS + 4 + len(_GUARD_END)
_MIN_STAMP_CONTRAST = 60            # white guards minus black guards, grey levels


def _stamp_geometry(width: int, height: int) -> tuple[int, int, int]:
    """(cell, x0, y0) of the stamp row in a width x height frame."""
    cell = max(4, width // 40)
    x0 = (width - _STAMP_CELLS * cell) // 2 // cell * cell
    return cell, x0, height - 2 * cell


def _stamp_cells(n: int) -> list[int]:
    value = n % (1 << _STAMP_BITS)
    bits = [(value >> (_STAMP_BITS - 1 - i)) & 1 for i in range(_STAMP_BITS)]
    check = 0
    for shift in range(0, _STAMP_BITS, 4):
        check ^= (value >> shift) & 15
    return [*_GUARD_START, *bits, *((check >> (3 - i)) & 1 for i in range(4)), *_GUARD_END]


def read_stamp(frame: Any) -> int | None:
    """The frame counter stamped by TestPattern.frame, or None when the guard
    squares or the check bits don't match (not a test-pattern frame, or one
    damaged past reading). `frame` must have the size it was drawn at."""
    np = _numpy()
    if getattr(frame, "ndim", 0) != 3 or frame.shape[2] != 3:
        return None
    height, width = frame.shape[:2]
    cell, x0, y0 = _stamp_geometry(width, height)
    if x0 < 0 or y0 < 0:
        return None
    q = cell // 4                   # sample each cell's middle half: edges blur
    row = frame[y0 + q:y0 + cell - q, x0:x0 + _STAMP_CELLS * cell].astype(np.float32)
    row = row.reshape(row.shape[0], _STAMP_CELLS, cell, 3)[:, :, q:cell - q, :]
    levels = row.mean(axis=(0, 2, 3))
    guard_at = list(range(4)) + list(range(_STAMP_CELLS - 4, _STAMP_CELLS))
    guards = [*_GUARD_START, *_GUARD_END]
    white = np.mean([levels[i] for i, g in zip(guard_at, guards) if g])
    black = np.mean([levels[i] for i, g in zip(guard_at, guards) if not g])
    if white - black < _MIN_STAMP_CONTRAST:
        return None
    cells = [int(level > (white + black) / 2) for level in levels]
    value = 0
    for bit in cells[4:4 + _STAMP_BITS]:
        value = value << 1 | bit
    return value if cells == _stamp_cells(value) else None


class TestPattern:
    """Draws frame n of a moving picture for `user`: a colour gradient that
    pans with n (consecutive frames differ like a slow camera pan), a bar that
    sweeps across, the user's ID and n at the top right on a dark band (the
    bar passes under it), and n again in a stamp that `read_stamp` reads
    back after lossy compression. OpenCV's own font has ASCII only, so
    accents are dropped and any other character outside it is stamped as
    its code point ("小明" as "U+5C0F U+660E"). Pure: frame(n) is the same picture every time it is
    asked for."""

    __test__ = False                # pytest: not a test class despite the name

    def __init__(self, user: str, width: int = VIDEO_WIDTH, height: int = VIDEO_HEIGHT) -> None:
        np = _numpy()
        _cv2()                          # frame() needs it: fail here, not mid-call
        self.user = user
        self.width = width
        self.height = height
        plain = "".join(c for c in unicodedata.normalize("NFKD", user)
                        if not unicodedata.combining(c))      # "Zoë" as "Zoe"
        self.label = re.sub(r"  +", " ", "".join(
            c if " " <= c <= "~" else f" U+{ord(c):04X} " for c in plain).strip())[:40]
        x = np.arange(width, dtype=np.float32) * (2 * math.pi / width)
        y = np.arange(height, dtype=np.float32)[:, None] / max(1, height - 1)
        background = np.empty((height, width, 3), np.uint8)
        background[..., 0] = 128 + 100 * np.sin(x)     # periodic in x: the pan has no seam
        background[..., 1] = 40 + 180 * y
        background[..., 2] = 128 + 100 * np.cos(x)
        background[:, ::64] //= 3                      # grid lines give motion search a grip
        background[::64, :] //= 3
        self._background = np.concatenate([background, background], axis=1)

    def frame(self, n: int) -> Any:
        """Frame number n, a new height x width x 3 uint8 BGR array."""
        cv2 = _cv2()
        w, h = self.width, self.height
        shift = (4 * n) % w
        image = self._background[:, shift:shift + w].copy()
        bar_x = (8 * n) % w
        image[:, bar_x:bar_x + max(2, w // 16)] = (255, 255, 255)
        scale = max(0.4, w / 640)
        texts = ((self.label, 40), (f"#{n}", 80))
        widest = max(cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, int(4 * scale))[0][0]
                     for text, _y in texts)
        image[:int(96 * scale), w - widest - int(24 * scale):] //= 4   # a dark band
        for text, y in texts:               # top right: a call window
            (text_w, _h), _base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale,
                                                  int(4 * scale))
            org = (w - text_w - int(12 * scale), int(y * scale))   # names tiles top left
            cv2.putText(image, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0),
                        int(4 * scale), cv2.LINE_AA)
            cv2.putText(image, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                        max(1, int(2 * scale)), cv2.LINE_AA)
        cell, x0, y0 = _stamp_geometry(w, h)
        image[y0 - cell:y0 + 2 * cell, :] = 128
        for i, bit in enumerate(_stamp_cells(n)):
            image[y0:y0 + cell, x0 + i * cell:x0 + (i + 1) * cell] = 255 * bit
        return image

    read_stamp = staticmethod(read_stamp)


# --- Video sources: test pattern, camera, looped file ------------------------
# One reader thread calls read() in a loop; close() may come from any thread
# and wakes a read that is waiting for its slot. The test pattern and files
# are paced by a _Schedule; a camera delivers at its own rate.

def _fit_frame(frame: Any, width: int, height: int) -> Any:
    """`frame` as a height x width x 3 BGR array (converted, resized if needed)."""
    cv2 = _cv2()
    if frame.ndim == 2:
        frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    elif frame.shape[2] == 4:
        frame = cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    if frame.shape[:2] != (height, width):
        frame = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
    return frame


class VideoSource:
    """Frames of one fixed size from a test pattern, a camera or a video file.

    Build with open_video_source(). read() returns the next BGR frame,
    waiting until it is due, or None once closed or when a camera stops
    giving frames (unplugged); the caller may then close and reopen. close()
    is safe to call twice and from another thread."""

    def __init__(self, kind: str, width: int, height: int, fps: int, paced: bool) -> None:
        self.kind = kind                # "test", "camera" or "file"
        self.width = width
        self.height = height
        self.fps = fps
        self._schedule = _Schedule(1.0 / fps) if paced else None
        self._closed = threading.Event()   # set by close(); also what paced reads wait on

    def read(self) -> Any:
        if self._schedule is not None and self._closed.wait(self._schedule.wait_s()):
            return None
        if self._closed.is_set():
            return None
        frame = self._grab()
        return None if frame is None else _fit_frame(frame, self.width, self.height)

    def _grab(self) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        self._closed.set()


class _PatternSource(VideoSource):
    """A TestPattern's frames 0, 1, 2, ... at `fps`."""

    def __init__(self, user: str, width: int, height: int, fps: int) -> None:
        super().__init__("test", width, height, fps, paced=True)
        self.pattern = TestPattern(user, width, height)
        self._n = 0                     # number of the next frame

    def _grab(self) -> Any:
        self._n += 1
        return self.pattern.frame(self._n - 1)


class _CaptureSource(VideoSource):
    """A camera index or a video file, through cv2.VideoCapture. A file
    loops: at its end we seek back to frame 0, or reopen it."""

    def __init__(self, spec: str, width: int, height: int, fps: int) -> None:
        is_camera = spec.isdecimal()
        super().__init__("camera" if is_camera else "file", width, height, fps,
                         paced=not is_camera)
        cv2 = _cv2("no_camera")
        self._spec = spec
        self._lock = threading.Lock()   # release() must not run inside read()
        if not is_camera and not os.path.isfile(spec):
            raise DeviceError("no_camera", f"no camera or video file called {spec!r}")
        self._cap = self._open()
        if is_camera:               # ask; a camera may give another size (we resize)
            self._cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
            self._cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
            self._cap.set(cv2.CAP_PROP_FPS, fps)
        ok, first = self._cap.read() if self._cap.isOpened() else (False, None)
        if not ok:
            self._cap.release()
            what = f"camera {spec}" if is_camera else f"video file {spec!r}"
            raise DeviceError("no_camera", f"{what} gives no pictures")
        self._first = first             # the frame read to check the device, shown first

    def _open(self) -> Any:
        cv2 = _cv2("no_camera")
        return cv2.VideoCapture(int(self._spec) if self.kind == "camera" else self._spec)

    def _grab(self) -> Any:
        with self._lock:
            if self._closed.is_set():
                return None
            if self._first is not None:
                frame, self._first = self._first, None
                return frame
            ok, frame = self._cap.read()
            if ok or self.kind == "camera":
                return frame if ok else None
            cv2 = _cv2("no_camera")
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, frame = self._cap.read()
            if not ok:                  # some containers can't seek: start over
                self._cap.release()
                self._cap = self._open()
                ok, frame = self._cap.read()
            return frame if ok else None

    def close(self) -> None:
        super().close()
        with self._lock:
            self._cap.release()


def open_video_source(spec: str, user: str, fps: int = VIDEO_FPS, width: int = VIDEO_WIDTH,
                      height: int = VIDEO_HEIGHT) -> VideoSource:
    """A VideoSource for `spec`: "test" (a TestPattern for `user`), a camera
    index such as "0", or a video file path (looped forever). Raises
    DeviceError("no_camera") when the camera or file gives no picture or
    OpenCV is missing."""
    if spec == "test":
        return _PatternSource(user, width, height, fps)
    return _CaptureSource(spec, width, height, fps)


# --- Video codecs: VP8 (PyAV) and JPEG (OpenCV), one interface ---------------
# Encoders take any BGR frame and return (bytes, is_keyframe) or None;
# decoders take bytes from the network, which are untrusted: garbage gives
# None, never an exception, and a header claiming a huge picture is refused
# before the decoder allocates it.

class VideoEncoder(Protocol):
    """Turns frames into packets. encode() returns (data, is_keyframe), or
    None when the encoder produced nothing for this frame; keyframe=True
    forces a keyframe (a peer joined or lost a packet). configure() sets the
    bitrate, frame rate and size of the frames that follow (RateController's
    settings); True means the next frame is a keyframe because of it."""
    codec_id: int
    name: str

    def encode(self, frame: Any, keyframe: bool = False) -> tuple[bytes, bool] | None: ...

    def configure(self, bitrate: int, fps: int, width: int, height: int) -> bool: ...

    def close(self) -> None: ...


class VideoDecoder(Protocol):
    """Turns packets back into BGR frames (of the size the sender chose);
    decode() returns None for data it can't decode and never raises."""
    codec_id: int
    name: str

    def decode(self, data: bytes) -> Any: ...

    def close(self) -> None: ...


def _vp8_pixels(data: bytes) -> int:
    """Pixels a VP8 keyframe header announces (RFC 6386 9.1); 0 for inter frames."""
    if data[0] & 1 or len(data) < 10 or data[3:6] != b"\x9d\x01\x2a":
        return 0
    width = int.from_bytes(data[6:8], "little") & 0x3FFF
    height = int.from_bytes(data[8:10], "little") & 0x3FFF
    return width * height


def _jpeg_pixels(data: bytes) -> int:
    """Pixels the first SOF segment of a JPEG announces; 0 if none was found."""
    i = 2
    while i + 9 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            i += 1 if marker == 0xFF else 2             # fill byte or marker with no length
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return (int.from_bytes(data[i + 5:i + 7], "big")
                    * int.from_bytes(data[i + 7:i + 9], "big"))
        if marker == 0xDA:              # image data starts: no size before it
            return 0
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return 0


class Vp8Encoder:
    """VP8 through PyAV's libvpx, tuned for calls: realtime deadline, no
    look-ahead (one packet out per frame in), error resilient, no alt-ref,
    a keyframe at least every VP8_KEYFRAME_FRAMES (2 s at full rate) and
    whenever asked. Frames of another size are scaled by PyAV to width x
    height. Each frame's time stamp advances by 1000 / fps ms, so libvpx's
    rate control shares the bitrate among the frames really sent."""
    codec_id = VIDEO_CODEC_IDS["vp8"]
    name = "vp8"

    def __init__(self, bitrate: int = VIDEO_BITRATE, width: int = VIDEO_WIDTH,
                 height: int = VIDEO_HEIGHT, fps: int = VIDEO_FPS) -> None:
        self._av = _av()
        _numpy()
        self.bitrate, self.fps, self.width, self.height = bitrate, fps, width, height
        self._ctx: Any = self._open()
        self._pts = 0                   # the next frame's time stamp, ms

    def _open(self) -> Any:
        ctx = self._av.CodecContext.create("libvpx", "w")
        ctx.width, ctx.height, ctx.pix_fmt = self.width, self.height, "yuv420p"
        ctx.time_base = Fraction(1, 1000)
        ctx.framerate = Fraction(self.fps, 1)
        ctx.bit_rate = self.bitrate
        ctx.gop_size = max(1, VP8_KEYFRAME_FRAMES * self.fps // VIDEO_FPS)  # kf_max_dist
        # One thread: a second one did not help at 640x480 (MEDIA-NOTES), and on a
        # busy 2-core machine waiting for it made frames take ~115 ms instead of ~6.
        ctx.thread_count = VP8_THREADS
        ctx.options = {"deadline": "realtime", "cpu-used": str(VP8_CPU_USED),
                       "lag-in-frames": "0", "error-resilient": "1", "auto-alt-ref": "0"}
        ctx.open()
        return ctx

    def configure(self, bitrate: int, fps: int, width: int, height: int) -> bool:
        """PyAV's libvpx reads the bitrate and the size only when it opens
        (setting bit_rate later changes nothing: checked with PyAV 18.1), so a
        new bitrate or size opens a new encoder, whose first frame is a
        keyframe (True). A new frame rate only changes the time stamps."""
        self.fps = max(1, fps)
        if (bitrate, width, height) == (self.bitrate, self.width, self.height):
            return False
        self.bitrate, self.width, self.height = bitrate, width, height
        self._ctx = self._open()
        return True

    def encode(self, frame: Any, keyframe: bool = False) -> tuple[bytes, bool] | None:
        av = self._av
        video_frame = av.VideoFrame.from_ndarray(_numpy().ascontiguousarray(frame),
                                                 format="bgr24")
        video_frame.pts = self._pts
        self._pts += round(1000 / self.fps)
        if keyframe:
            video_frame.pict_type = av.video.frame.PictureType.I
        packets = self._ctx.encode(video_frame)
        if not packets:                 # rate control dropped the frame
            return None
        # lag-in-frames 0 means one packet per frame; more would be a libvpx change.
        packet = packets[-1]
        return bytes(packet), bool(packet.is_keyframe)

    def close(self) -> None:
        self._ctx = None


class Vp8Decoder:
    """VP8 through PyAV's native decoder ("vp8"); see VideoDecoder."""
    codec_id = VIDEO_CODEC_IDS["vp8"]
    name = "vp8"

    def __init__(self) -> None:
        self._av = _av()
        _numpy()
        self._ctx = self._av.CodecContext.create("vp8", "r")
        self._ctx.thread_count = VP8_THREADS    # as the encoder; no slower measured here

    def decode(self, data: bytes) -> Any:
        # An empty packet would mean end of stream and end the decoder for good.
        if len(data) < 3 or _vp8_pixels(data) > MAX_DECODE_PIXELS or self._ctx is None:
            return None
        try:
            frames = self._ctx.decode(self._av.Packet(bytes(data)))
            return frames[-1].to_ndarray(format="bgr24") if frames else None
        except (self._av.FFmpegError, ValueError):  # libvpx's many ways to say no
            return None

    def close(self) -> None:
        self._ctx = None


class JpegEncoder:
    """JPEG through OpenCV; every frame stands alone, so each is a keyframe.
    Given a bitrate (configure), the quality follows it: down by JPEG_QUALITY_STEP
    while frames come out over bitrate / fps, up again while well under, never
    above `quality` nor below JPEG_MIN_QUALITY. Frames are scaled to the size
    configured."""
    codec_id = VIDEO_CODEC_IDS["jpeg"]
    name = "jpeg"

    def __init__(self, quality: int = JPEG_QUALITY) -> None:
        self._cv2 = _cv2()
        self.quality = quality
        self.current = quality          # the quality in use, under a bitrate
        self.budget: float | None = None    # bytes a frame may take; None: no limit
        self.size: tuple[int, int] | None = None    # (width, height); None: as given

    def configure(self, bitrate: int, fps: int, width: int, height: int) -> bool:
        self.budget = bitrate / 8 / max(1, fps)
        self.size = (width, height)
        return False

    def encode(self, frame: Any, keyframe: bool = False) -> tuple[bytes, bool] | None:
        cv2 = self._cv2
        if self.size is not None and frame.shape[1::-1] != self.size:
            frame = cv2.resize(frame, self.size, interpolation=cv2.INTER_AREA)
        ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, self.current])
        if self.budget is not None and ok:
            if data.size > self.budget:
                self.current = max(JPEG_MIN_QUALITY, self.current - JPEG_QUALITY_STEP)
            elif data.size < 0.7 * self.budget:
                self.current = min(self.quality, self.current + JPEG_QUALITY_STEP)
        return (data.tobytes(), True) if ok else None

    def close(self) -> None:
        pass


class JpegDecoder:
    """JPEG through OpenCV; see VideoDecoder."""
    codec_id = VIDEO_CODEC_IDS["jpeg"]
    name = "jpeg"

    def __init__(self) -> None:
        self._cv2 = _cv2()
        self._np = _numpy()

    def decode(self, data: bytes) -> Any:
        if len(data) < 4 or data[:2] != b"\xff\xd8" or _jpeg_pixels(data) > MAX_DECODE_PIXELS:
            return None
        try:
            return self._cv2.imdecode(self._np.frombuffer(data, self._np.uint8),
                                      self._cv2.IMREAD_COLOR)
        except self._cv2.error:
            return None

    def close(self) -> None:
        pass


def available_video_codecs() -> list[str]:
    """Codec names this machine can use, preferred first: "vp8" if PyAV with
    libvpx loads, "jpeg" if OpenCV loads. Never raises."""
    names = []
    with contextlib.suppress(DeviceError, OSError):
        if _numpy() is not None and "libvpx" in _av().codecs_available:
            names.append("vp8")
    with contextlib.suppress(DeviceError, OSError):
        names.append(_cv2() and "jpeg")
    return names


def make_video_encoder(name: str, bitrate: int = VIDEO_BITRATE) -> VideoEncoder:
    """A new encoder for "vp8" or "jpeg" (which ignores `bitrate`). Raises
    DeviceError("missing_package") when its package is absent, ValueError
    for another name."""
    if name not in VIDEO_CODEC_IDS:
        raise ValueError(f"unknown video codec {name!r}")
    return Vp8Encoder(bitrate) if name == "vp8" else JpegEncoder()


def make_video_decoder(name: str) -> VideoDecoder:
    """A new decoder for "vp8" or "jpeg"; errors as make_video_encoder."""
    if name not in VIDEO_CODEC_IDS:
        raise ValueError(f"unknown video codec {name!r}")
    return Vp8Decoder() if name == "vp8" else JpegDecoder()


# =============================================================================
# 12. SOUND DEVICES: Opus and PCM, microphones and speakers, devices, recording
# =============================================================================
# Voice below the network: Opus through the libopus inside PyAV's wheel
# (ctypes: PyAV's own API has no loss concealment), or 16 kHz PCM; PyAudio
# streams, or clock threads that stand in for them (`null`, `tone`), each
# rate-limited so an unclocked device can't flood a call; mixing; the list
# of devices; and the recorder behind --record. Audio frames are 20 ms of
# 48 kHz mono int16 (1920 bytes).

# --- Voice codecs: Opus (libopus through ctypes) and 16 kHz PCM ----------------
# PyAV's Opus API has no loss concealment or FEC; the libopus shipped inside
# its wheel has both, so we call it with ctypes (MEDIA-NOTES.md). Encoders take
# one 1920-byte frame; decoders always return one 1920-byte frame. A decoder's
# three calls: decode(packet) for a packet that came, conceal() for a lost
# one, decode_fec(next) for a lost one when the next packet is already here
# (then decode(next) as usual).

_OPUS_OK = 0
_OPUS_APPLICATION_VOIP = 2048
_OPUS_SET_BITRATE = 4002
_OPUS_SET_INBAND_FEC = 4012
_OPUS_SET_PACKET_LOSS_PERC = 4014


def _find_libopus() -> str | None:
    """Path of the libopus in PyAV's wheel, else the system's, else None."""
    with contextlib.suppress(ImportError):
        import av
        package = Path(av.__file__).parent
        patterns = [package.parent / "av.libs" / "libopus*.so*",      # Linux (auditwheel)
                    package / ".dylibs" / "libopus*.dylib",           # macOS (delocate)
                    package.parent / "av.libs" / "opus*.dll",         # Windows (delvewheel)
                    package.parent / "av.libs" / "libopus*.dll"]
        for pattern in patterns:
            found = sorted(glob.glob(str(pattern)))
            if found:
                return found[0]
    return ctypes.util.find_library("opus")


@functools.lru_cache(maxsize=1)
def _libopus() -> Any:
    """libopus with every function we call declared, or None if none loads."""
    path = _find_libopus()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    c = ctypes
    declarations = {            # name: (argtypes, restype)
        "opus_encoder_create": ([c.c_int32, c.c_int, c.c_int, c.POINTER(c.c_int)], c.c_void_p),
        "opus_encoder_destroy": ([c.c_void_p], None),
        "opus_encode": ([c.c_void_p, c.POINTER(c.c_int16), c.c_int, c.c_char_p, c.c_int32],
                        c.c_int32),
        # Variadic: only the fixed part is declared, and callers pass c_int32 values, so
        # ctypes makes a variadic call (which differs from a fixed one on Apple arm64).
        "opus_encoder_ctl": ([c.c_void_p, c.c_int], c.c_int),
        "opus_decoder_create": ([c.c_int32, c.c_int, c.POINTER(c.c_int)], c.c_void_p),
        "opus_decoder_destroy": ([c.c_void_p], None),
        "opus_decode": ([c.c_void_p, c.c_char_p, c.c_int32, c.POINTER(c.c_int16), c.c_int,
                         c.c_int], c.c_int),
        "opus_get_version_string": ([], c.c_char_p),
    }
    try:
        for name, (argtypes, restype) in declarations.items():
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, restype
    except AttributeError:          # not a libopus after all
        return None
    return lib


class _OpusObject:
    """Owns one native libopus object: close() frees it once; __del__ too."""
    _state: Any = None              # the OpusEncoder* or OpusDecoder*
    _destroy = ""                   # the libopus function that frees it

    def __init__(self) -> None:
        self._lib = _libopus()
        if self._lib is None:
            raise DeviceError("missing_package", "Opus needs PyAV's libopus: pip install av")

    def _created(self, state: Any, error: ctypes.c_int, what: str) -> None:
        self._state = state or None
        if error.value != _OPUS_OK or not state:
            self.close()
            raise RuntimeError(f"{what} failed ({error.value})")

    def close(self) -> None:
        state, self._state = self._state, None
        if state:
            getattr(self._lib, self._destroy)(state)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):    # at interpreter exit ctypes may be gone
            self.close()


class OpusEncoder(_OpusObject):
    """Opus, 48 kHz mono, 20 ms frames, VOIP mode, with in-band FEC sized for
    10% loss. encode(pcm) takes 1920 bytes and returns one packet (~60 bytes
    at 24 kb/s). close() frees the native encoder; it is safe to call twice."""
    codec_id = AUDIO_CODEC_IDS["opus"]
    name = "opus"
    _destroy = "opus_encoder_destroy"

    def __init__(self, bitrate: int = OPUS_BITRATE) -> None:
        super().__init__()
        error = ctypes.c_int(0)
        state = self._lib.opus_encoder_create(SAMPLE_RATE, 1, _OPUS_APPLICATION_VOIP,
                                              ctypes.byref(error))
        self._created(state, error, "opus_encoder_create")
        for request, value in ((_OPUS_SET_BITRATE, bitrate), (_OPUS_SET_INBAND_FEC, 1),
                               (_OPUS_SET_PACKET_LOSS_PERC, OPUS_LOSS_PERCENT)):
            result = self._lib.opus_encoder_ctl(self._state, request, ctypes.c_int32(value))
            if result != _OPUS_OK:
                self.close()
                raise RuntimeError(f"opus_encoder_ctl({request}) failed ({result})")
        self._out = ctypes.create_string_buffer(OPUS_MAX_PACKET_BYTES)

    def encode(self, pcm: bytes) -> bytes:
        if len(pcm) != FRAME_BYTES:
            raise ValueError(f"Opus frames are {FRAME_BYTES} bytes, not {len(pcm)}")
        if not self._state:
            raise RuntimeError("encoder is closed")
        samples = (ctypes.c_int16 * FRAME_SAMPLES).from_buffer_copy(pcm)
        size = self._lib.opus_encode(self._state, samples, FRAME_SAMPLES, self._out,
                                     OPUS_MAX_PACKET_BYTES)
        if size < 0:
            raise RuntimeError(f"opus_encode failed ({size})")
        return self._out.raw[:size]


class OpusDecoder(_OpusObject):
    """Opus decoder, 48 kHz mono; every call returns 1920 bytes. decode()
    of garbage, or of a packet longer than 20 ms, returns concealment instead
    of raising. close() frees the native decoder; safe to call twice."""
    codec_id = AUDIO_CODEC_IDS["opus"]
    name = "opus"
    _destroy = "opus_decoder_destroy"

    def __init__(self) -> None:
        super().__init__()
        error = ctypes.c_int(0)
        self._created(self._lib.opus_decoder_create(SAMPLE_RATE, 1, ctypes.byref(error)),
                      error, "opus_decoder_create")
        self._pcm = (ctypes.c_int16 * FRAME_SAMPLES)()

    def _run(self, data: bytes | None, fec: int) -> bytes | None:
        if not self._state:
            return SILENCE
        count = self._lib.opus_decode(self._state, data, len(data) if data else 0,
                                      self._pcm, FRAME_SAMPLES, fec)
        if count < 0:
            return None
        return bytes(self._pcm)[:2 * count].ljust(FRAME_BYTES, b"\0")

    def decode(self, data: bytes) -> bytes:
        if not data or len(data) > OPUS_MAX_PACKET_BYTES:
            return self.conceal()
        return self._run(bytes(data), 0) or self.conceal()

    def conceal(self) -> bytes:
        """A frame that hides one lost packet (libopus's PLC: a NULL packet)."""
        return self._run(None, 0) or SILENCE

    def decode_fec(self, next_packet: bytes) -> bytes:
        """The lost frame before `next_packet`, rebuilt from the FEC data it
        carries (concealment if it carries none). Decode next_packet after."""
        if not next_packet or len(next_packet) > OPUS_MAX_PACKET_BYTES:
            return self.conceal()
        return self._run(bytes(next_packet), 1) or self.conceal()


class PcmCodec:
    """Uncompressed fallback, both ends in one: encode() sends 16 kHz (each
    3 samples averaged: 640 bytes a frame), decode() interpolates back to 48
    kHz. conceal() repeats the last frame at half the level each time, so a
    gap fades out instead of clicking; decode_fec() can only conceal."""
    codec_id = AUDIO_CODEC_IDS["pcm"]
    name = "pcm"

    def __init__(self) -> None:
        self._np = _numpy()
        self._last: Any = None          # the last frame played, as float samples

    def encode(self, pcm: bytes) -> bytes:
        np = self._np
        if len(pcm) != FRAME_BYTES:
            raise ValueError(f"PCM frames are {FRAME_BYTES} bytes, not {len(pcm)}")
        samples = np.frombuffer(pcm, "<i2").astype(np.int32).reshape(-1, PCM_RATIO)
        return np.round(samples.mean(axis=1)).astype("<i2").tobytes()

    def decode(self, data: bytes) -> bytes:
        np = self._np
        if len(data) != FRAME_BYTES // PCM_RATIO:
            return self.conceal()
        low = np.frombuffer(data, "<i2").astype(np.float32)
        # Each 16 kHz sample is the average of 3: it stands at the middle one.
        at = np.arange(len(low)) * PCM_RATIO + 1
        self._last = np.interp(np.arange(FRAME_SAMPLES), at, low)
        return np.round(self._last).astype("<i2").tobytes()

    def conceal(self) -> bytes:
        if self._last is None:
            return SILENCE
        self._last = self._last * 0.5
        return self._np.round(self._last).astype("<i2").tobytes()

    def decode_fec(self, next_packet: bytes) -> bytes:
        return self.conceal()

    def close(self) -> None:
        self._last = None


def available_audio_codecs() -> list[str]:
    """["opus", "pcm"] where libopus loads, else ["pcm"] (needs numpy). Never raises."""
    names = ["opus"] if _libopus() is not None else []
    with contextlib.suppress(DeviceError):
        _numpy()
        names.append("pcm")
    return names


def make_audio_encoder(name: str) -> OpusEncoder | PcmCodec:
    """A new encoder for "opus" or "pcm": DeviceError("missing_package") when
    it can't load, ValueError for another name."""
    if name not in AUDIO_CODEC_IDS:
        raise ValueError(f"unknown audio codec {name!r}")
    return OpusEncoder() if name == "opus" else PcmCodec()


def make_audio_decoder(name: str) -> OpusDecoder | PcmCodec:
    """A new decoder for "opus" or "pcm"; errors as make_audio_encoder."""
    if name not in AUDIO_CODEC_IDS:
        raise ValueError(f"unknown audio codec {name!r}")
    return OpusDecoder() if name == "opus" else PcmCodec()


# --- WAV files as a microphone (--audio FILE.wav) ----------------------------
# For tests and demonstrations: a file's sound, looped, stands in for a
# microphone. Any PCM WAV the standard library reads (8 to 32 bits, any
# channel count up to 16, 8 to 192 kHz) becomes 48 kHz mono int16: channels
# averaged, resampled by linear interpolation (plenty for speech, not for
# music). The file is untrusted: its header may lie, so at most WAV_MAX_S of
# it, and WAV_MAX_BYTES of its data, are read.

WAV_MAX_S = 120                     # seconds of a WAV file used (then it loops)
WAV_MAX_BYTES = 64 * 1024 * 1024    # of its sample data, read at most
_WAV_RATES = (8_000, 192_000)       # sample rates accepted, inclusive


def is_wav_spec(spec: str) -> bool:
    """Does an --audio value name a WAV file (by its .wav ending)?"""
    return spec.lower().endswith(".wav")


def is_device_spec(spec: str) -> bool:
    """Does an --audio value name a sound device ("default", "N"), not a
    stand-in ("null", "tone", a WAV file) that has no room to echo in?"""
    return spec not in ("null", "tone") and not is_wav_spec(spec)


def load_wav(path: str) -> Any:
    """The sound of WAV file `path` as a numpy int16 array at 48 kHz mono (at
    most WAV_MAX_S long). Raises DeviceError("no_audio_device") with a sentence
    for a person when the file is missing, isn't a PCM WAV, or holds no sound."""
    np = _numpy("no_audio_device")

    def unusable(why: str) -> DeviceError:
        return DeviceError("no_audio_device", f"can't use {path} as a microphone: {why}")
    try:
        with wave.open(path, "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            if not 1 <= channels <= 16 or not _WAV_RATES[0] <= rate <= _WAV_RATES[1]:
                raise unusable(f"{channels} channels at {rate} Hz is not a voice")
            count = min(wav.getnframes(), WAV_MAX_S * rate, WAV_MAX_BYTES // (channels * width))
            data = wav.readframes(count)
    except DeviceError:
        raise
    # wave.Error: not RIFF, not PCM...; a chunk longer than the file: a bare
    # RuntimeError from wave's own seek, or EOFError, or struct.error.
    except (OSError, EOFError, wave.Error, RuntimeError, ValueError, struct.error) as exc:
        raise unusable(_why(exc) or "it is not a WAV file") from None
    data = data[:len(data) // (channels * width) * (channels * width)]
    if not data:
        raise unusable("it holds no sound")
    raw = np.frombuffer(data, np.uint8).reshape(-1, width)
    if width == 1:                      # 8-bit WAV is unsigned
        samples = (raw[:, 0].astype(np.float32) - 128) * 256
    else:                               # little-endian signed: keep the top two bytes
        samples = raw[:, -2:].copy().view("<i2")[:, 0].astype(np.float32)
    mono = samples.reshape(-1, channels).mean(axis=1)
    if rate != SAMPLE_RATE:
        at = np.arange(int(len(mono) * SAMPLE_RATE / rate)) * (rate / SAMPLE_RATE)
        mono = np.interp(at, np.arange(len(mono)), mono)
    if len(mono) == 0:
        raise unusable("it holds no sound")
    return np.clip(np.round(mono), -32768, 32767).astype("<i2")


# --- Sound in and out: clock threads, PyAudio streams, mixing ----------------
# A source calls on_frame(1920 bytes) once per 20 ms; a sink calls pull() once
# per 20 ms for the frame to play. Both run on the stream's own thread (a
# clock thread, or PortAudio's callback thread), so the callables must be
# quick and thread-safe; an exception in them is logged once and the stream
# goes on. Some devices are not clocked (ALSA's null PCM calls back ~100k
# times a second), so PyAudio deliveries pass a token bucket that admits 50
# a second with small bursts and drops the rest. Streams are mono: PortAudio
# converts for the "default" devices of ALSA/Pulse, CoreAudio and MME.

class _TokenBucket:
    """Admits `rate_per_s` events a second on average, `burst` at once."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tokens = float(burst)
        self._last_s = time.monotonic()

    def take(self) -> bool:
        """True (and one token used) if an event may pass now."""
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last_s) * self.rate_per_s)
        self._last_s = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def nap(self) -> None:
        """Sleep until the next token, at most one frame. Only an unclocked
        device outruns the bucket, and its callbacks would spin a core."""
        time.sleep(min(FRAME_S, max(0.0, (1 - self._tokens) / self.rate_per_s)))


def _guarded(function: Callable, what: str) -> Callable:
    """`function` for a media thread: an exception is logged the first time
    and otherwise swallowed (giving None), because raising kills the stream."""
    logged = False

    def call(*args: Any) -> Any:
        nonlocal logged
        try:
            return function(*args)
        except Exception:
            if not logged:
                logged = True
                log.exception("%s failed (later failures are not logged)", what)
            return None
    return call


def _open_pa_stream(spec: str, output: bool, callback: Callable) -> tuple[Any, Any]:
    """(PyAudio, stopped mono stream in callback mode) for device `spec`
    ("default" or an index). Raises DeviceError("no_audio_device")."""
    pyaudio = _pyaudio()
    kind = "output" if output else "input"
    if spec != "default" and not spec.isdecimal():
        raise DeviceError("no_audio_device", f"no audio {kind} called {spec!r}")
    with _quiet_stderr():
        pa = pyaudio.PyAudio()
    try:
        with _quiet_stderr():
            # An index PortAudio doesn't know crashes pa.open: look it up first (OSError).
            if spec != "default":
                info = pa.get_device_info_by_index(int(spec))
            else:
                info = (pa.get_default_output_device_info() if output
                        else pa.get_default_input_device_info())
            if info["maxOutputChannels" if output else "maxInputChannels"] < 1:
                raise OSError(f"{info['name']!r} has no {kind} channels")
            index = info["index"]
            stream = pa.open(rate=SAMPLE_RATE, channels=1, format=pyaudio.paInt16,
                             input=not output, output=output,
                             input_device_index=None if output else index,
                             output_device_index=index if output else None,
                             frames_per_buffer=FRAME_SAMPLES, stream_callback=callback,
                             start=False)
        return pa, stream
    except (OSError, ValueError) as exc:
        pa.terminate()
        raise DeviceError("no_audio_device", f"can't open audio {kind} {spec!r}: {exc}") \
            from None


class _AudioStream:
    """What sources and sinks share: "null", "tone" and a WAV file run a clock
    thread that calls _tick() every 20 ms on a monotonic schedule; any other spec
    opens a PyAudio stream whose callback is _callback(). stop() is idempotent, may
    come before start(), and must not be called from on_frame or pull (the
    stream's own thread: PortAudio can't stop a stream from its callback)."""
    _output = False

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self._np = _numpy("no_audio_device")
        self._bucket = _TokenBucket(1 / FRAME_S, AUDIO_BURST_FRAMES)
        self._pending = bytearray()     # device audio not yet cut into whole frames
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stream: Any = None
        if is_device_spec(spec):
            self._pyaudio = _pyaudio()
            self._pa, self._stream = _open_pa_stream(spec, self._output, self._callback)

    def _start(self) -> None:
        if self._stream is not None:
            self._stream.start_stream()
            return
        self._thread = threading.Thread(target=self._clock, daemon=True,
                                        name=f"audio-{type(self).__name__}:{self.spec}")
        self._thread.start()

    def _clock(self) -> None:
        schedule = _Schedule(FRAME_S, catch_up=CLOCK_CATCH_UP_FRAMES)
        while not self._stop.wait(schedule.wait_s()):
            self._tick()

    def _tick(self) -> None:
        raise NotImplementedError

    def _callback(self, data: Any, frame_count: int, time_info: Any, status: int) -> tuple:
        raise NotImplementedError

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(STOP_TIMEOUT_S)
        if self._stream is not None:
            with contextlib.suppress(OSError):
                self._stream.stop_stream()
            self._stream.close()
            self._pa.terminate()


class AudioSource(_AudioStream):
    """Delivers 20 ms frames of 48 kHz mono int16. Build with
    open_audio_source(). start(on_frame) calls on_frame(1920 bytes) about 50
    times a second from the source's own thread until stop(); while `muted`
    is True it delivers silence and the device stays open."""

    def __init__(self, spec: str) -> None:
        self._wav = load_wav(spec) if is_wav_spec(spec) else None  # before a device opens
        super().__init__(spec)
        self.muted = False
        self._on_frame: Callable = lambda frame: None
        self._sample = 0                # tone phase in samples; mod 1 s keeps it exact
        self._position = 0              # where in the WAV file the next frame starts

    def start(self, on_frame: Callable[[bytes], None]) -> None:
        self._on_frame = _guarded(on_frame, f"audio source {self.spec}")
        self._start()

    def _tick(self) -> None:
        if self.muted or self.spec == "null":
            self._on_frame(SILENCE)
            return
        np = self._np
        if self._wav is not None:       # looped: the frame that wraps takes the start too
            at = (self._position + np.arange(FRAME_SAMPLES)) % len(self._wav)
            self._position = (self._position + FRAME_SAMPLES) % len(self._wav)
            self._on_frame(self._wav[at].tobytes())
            return
        k = self._sample + np.arange(FRAME_SAMPLES)
        self._sample = (self._sample + FRAME_SAMPLES) % SAMPLE_RATE
        amplitude = 32767 * 10 ** (TONE_DBFS / 20)
        tone = amplitude * np.sin(2 * np.pi * TONE_HZ / SAMPLE_RATE * k)
        self._on_frame(np.round(tone).astype("<i2").tobytes())

    def _callback(self, data: Any, frame_count: int, time_info: Any, status: int) -> tuple:
        self._pending += data or bytes(2 * frame_count)
        while len(self._pending) >= FRAME_BYTES:
            frame = bytes(self._pending[:FRAME_BYTES])
            del self._pending[:FRAME_BYTES]
            if self._bucket.take():
                self._on_frame(SILENCE if self.muted else frame)
            else:                       # faster than real time: drop it
                self._bucket.nap()
        return None, self._pyaudio.paContinue


def open_audio_source(spec: str) -> AudioSource:
    """An AudioSource for `spec`: "null" (silence, no device), "tone" (440 Hz
    at -12 dBFS, continuous across frames), a path ending in ".wav" (that
    file, looped: see load_wav), "default" or a PyAudio input index "N".
    Raises DeviceError("no_audio_device") when the device, the file or
    PyAudio is missing or won't open."""
    return AudioSource(spec)


class AudioSink(_AudioStream):
    """Plays 20 ms frames. Build with open_audio_sink(). start(pull) calls
    pull() about 50 times a second from the sink's own thread until stop();
    pull returns the 1920-byte frame to play (a short one is padded with
    silence). "null", "tone" and WAV-file sinks have no device: a clock pulls
    and drops (--record keeps what a call plays)."""
    _output = True

    def __init__(self, spec: str) -> None:
        super().__init__(spec)
        self._pull: Callable = lambda: SILENCE

    def start(self, pull: Callable[[], bytes]) -> None:
        self._pull = _guarded(pull, f"audio sink {self.spec}")
        self._start()

    def _tick(self) -> None:
        self._pull()

    def _callback(self, data: Any, frame_count: int, time_info: Any, status: int) -> tuple:
        need = 2 * frame_count
        while len(self._pending) < need:
            if self._bucket.take():
                frame = self._pull()
                ok = isinstance(frame, (bytes, bytearray))
                self._pending += bytes(frame[:FRAME_BYTES]).ljust(FRAME_BYTES, b"\0") \
                    if ok else SILENCE
            else:                       # faster than real time: silence, no pull
                self._bucket.nap()
                self._pending += SILENCE
        out = bytes(self._pending[:need])
        del self._pending[:need]
        return out, self._pyaudio.paContinue


def open_audio_sink(spec: str) -> AudioSink:
    """An AudioSink for `spec`: "null", "tone" or a WAV file (a clock, no
    device), "default" or a PyAudio output index "N". Raises DeviceError like
    open_audio_source."""
    return AudioSink(spec)


def mix(frames: list[bytes]) -> bytes:
    """The int16 sum of `frames`, clipped to the int16 range; shorter frames
    count as padded with silence; no frames gives one frame of silence."""
    np = _numpy()
    if not frames:
        return SILENCE
    total = np.zeros(max(len(f) for f in frames) // 2, np.int32)
    for frame in frames:
        samples = np.frombuffer(frame[:len(frame) // 2 * 2], "<i2")
        total[:len(samples)] += samples
    return np.clip(total, -32768, 32767).astype("<i2").tobytes()


# --- Echo cancelling, noise suppression, gain: WebRTC's APM (livekit) --------
# With laptop speakers the microphone hears what the call plays, and each peer
# hears their own voice back a round trip late. WebRTC's audio processing
# module cancels that echo (AEC3), suppresses steady noise, cuts rumble below
# ~80 Hz and lifts a quiet voice (its adaptive digital gain controller); the
# livekit package ships it prebuilt for Windows, macOS and Linux, offline
# (MEDIA-NOTES.md: 41 dB of a synthetic laptop echo removed, the best by far).
# It works on 10 ms frames, so each of our 20 ms frames is two. Its far end is
# what the speaker is given, the mix of every peer; AEC3 finds the delay from
# there to the echo in the microphone by itself, so the delay we report is 0.
# Only real devices need it: a stand-in (null, tone, a WAV file) plays into
# no room, and noise suppression would even take a steady tone for noise.

def echo_canceller_available() -> bool:
    """Is livekit installed? (Asked without importing it: that takes ~0.3 s.)"""
    return importlib.util.find_spec("livekit") is not None


class VoiceProcessor:
    """Echo cancelling, noise suppression, a high-pass filter and automatic
    gain for one microphone, from the first call that opens the devices to
    the last that closes them.

    play(pcm) with every 20 ms frame handed to the speaker (the sink's thread);
    capture(pcm) -> the microphone's 20 ms frame, cleaned (the source's thread).
    Thread-safe: a lock, held ~0.1 ms, keeps the two threads out of the
    native module at once. Building one raises DeviceError("missing_package")
    if livekit is missing or its native library won't load. If the module
    fails mid-call, the failure is logged once, `working` turns False and
    capture() hands the microphone on as it is.
    """
    _HALF = FRAME_BYTES // 2            # 10 ms

    def __init__(self) -> None:
        try:
            from livekit import rtc
            self._apm: Any = rtc.AudioProcessingModule(
                echo_cancellation=True, noise_suppression=True, high_pass_filter=True,
                auto_gain_control=True)
        except Exception as exc:        # ImportError, or the native library's own
            raise DeviceError("missing_package", "echo cancelling needs livekit: pip "
                              f"install livekit ({_why(exc)})") from exc
        self._frame = rtc.AudioFrame
        self._lock = threading.Lock()
        self.working = True             # False once the module has failed

    def _run(self, pcm: bytes, method: str) -> bytes:
        """`pcm` (20 ms) through the module's `method`, 10 ms at a time."""
        out = bytearray(pcm[:FRAME_BYTES].ljust(FRAME_BYTES, b"\0"))
        if not self.working:
            return bytes(out)
        halves = [bytearray(out[:self._HALF]), bytearray(out[self._HALF:])]
        try:
            with self._lock:
                for half in halves:     # processed in place: the frame wraps our buffer
                    frame = self._frame(half, SAMPLE_RATE, 1, FRAME_SAMPLES // 2)
                    if method == "capture":
                        self._apm.set_stream_delay_ms(0)   # the module's contract
                        self._apm.process_stream(frame)
                    else:
                        self._apm.process_reverse_stream(frame)
        except Exception:               # RuntimeError from the native side, or a bug
            self.working = False
            log.exception("echo cancelling failed; the microphone goes out as it is")
            return bytes(out)
        return bytes(halves[0] + halves[1])

    def play(self, pcm: bytes) -> None:
        """The frame the speaker is about to play: the echo to look for."""
        self._run(pcm, "play")

    def capture(self, pcm: bytes) -> bytes:
        """The microphone's frame with the echo, noise and rumble taken out."""
        return self._run(pcm, "capture")

    def close(self) -> None:
        """Let the native module go (when no reference is left). Safe twice."""
        self.working = False
        self._apm = None


def echo_canceller_check() -> dict:
    """Does echo cancelling work here? {"works": bool, "why": "" or a
    sentence}. Builds a VoiceProcessor and runs a frame through each side, so
    a native library an executable lacks shows (for --list-devices). Never
    raises."""
    try:
        voice = VoiceProcessor()
    except DeviceError as exc:
        return {"works": False, "why": exc.message}
    try:
        voice.play(SILENCE)
        voice.capture(SILENCE)
        return {"works": voice.working,
                "why": "" if voice.working else "livekit's audio processing failed"}
    finally:
        voice.close()


# --- The devices this machine has --------------------------------------------

def list_devices() -> dict:
    """{"cameras": [indexes that open], "audio_inputs": [{"index", "name",
    "channels"}], "audio_outputs": [same], "video_codecs": [...],
    "audio_codecs": [...], "echo_cancel": echo_canceller_check()}. The
    codecs are those that really load here, best first (an executable that
    lacks a library shows it). Never raises: a missing package or a failing
    probe gives empty lists."""
    found: dict = {"cameras": [], "audio_inputs": [], "audio_outputs": [],
                   "video_codecs": available_video_codecs(),
                   "audio_codecs": available_audio_codecs(),
                   "echo_cancel": echo_canceller_check()}
    try:
        cv2 = _cv2()
        for index in CAMERA_PROBE_INDEXES:
            # On Linux a missing /dev/videoN answers at once; elsewhere we must ask.
            if sys.platform.startswith("linux") and not os.path.exists(f"/dev/video{index}"):
                continue
            capture = cv2.VideoCapture(index)
            if capture.isOpened():
                found["cameras"].append(index)
            capture.release()
    except Exception:                   # the contract: never raise
        log.debug("camera probe failed", exc_info=True)
    try:
        pyaudio = _pyaudio()
        with _quiet_stderr():
            pa = pyaudio.PyAudio()
        try:
            for index in range(pa.get_device_count()):
                info = pa.get_device_info_by_index(index)
                for key, kind in (("maxInputChannels", "audio_inputs"),
                                  ("maxOutputChannels", "audio_outputs")):
                    if int(info[key]) > 0:
                        found[kind].append({"index": index, "name": str(info["name"]),
                                            "channels": int(info[key])})
        finally:
            pa.terminate()
    except Exception:
        log.debug("audio device probe failed", exc_info=True)
    return found


# --- Recording what a call plays (--record) ----------------------------------
# Peer names come from the network: they become file names only through
# safe_filename (ROOMS), and two names that clean up alike get distinct files.

class Recorder:
    """Records a call into `folder` (created if needed; use a fresh one per
    call, as existing files are overwritten): audio(peer, pcm) appends to
    <peer>.wav (48 kHz mono 16-bit), frame(peer, image, now_s) keeps at most
    one picture a second per peer as <peer>-1.png, <peer>-2.png, ...
    Thread-safe. Each WAV header is brought up to date on every write and
    flushed to disk every `flush_s`, so a killed process leaves
    readable files; close() finishes them and is safe to call twice."""

    def __init__(self, folder: Path, flush_s: float = RECORD_FLUSH_S) -> None:
        self.folder = Path(folder)
        self.flush_s = flush_s          # a killed process loses at most this much sound
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._stems: dict[str, str] = {}        # peer name -> its file stem
        self._wavs: dict[str, tuple[Any, Any]] = {}     # peer -> (file, wave writer)
        self._flushed_s: dict[str, float] = {}  # peer -> monotonic time of the last flush
        self._pictures: dict[str, tuple[int, float]] = {}   # peer -> (count, now_s of last)
        self._closed = False

    def _stem(self, peer: str) -> str:
        stem = self._stems.get(peer)
        if stem is None:
            # "a/b" and "a?b" both clean up to "a_b"; "A" and "a" clash on Windows and macOS.
            taken = {stem.casefold() for stem in self._stems.values()}
            base = stem = safe_filename(peer)
            n = 1
            while stem.casefold() in taken:
                n += 1
                stem = f"{base}_{n}"
            self._stems[peer] = stem
        return stem

    def audio(self, peer: str, pcm: bytes) -> None:
        """Append `pcm` (48 kHz mono int16) to the peer's WAV; ignored after close()."""
        with self._lock:
            if self._closed:
                return
            if peer not in self._wavs:
                handle = open(self.folder / f"{self._stem(peer)}.wav", "wb")  # noqa: SIM115
                writer = wave.open(handle, "wb")  # noqa: SIM115 (both open until close())
                writer.setnchannels(1)
                writer.setsampwidth(2)
                writer.setframerate(SAMPLE_RATE)
                self._wavs[peer] = (handle, writer)
                self._flushed_s[peer] = time.monotonic()
            handle, writer = self._wavs[peer]
            # wave patches the header's sizes after each writeframes on a seekable file.
            writer.writeframes(pcm[:len(pcm) // 2 * 2])
            if time.monotonic() - self._flushed_s[peer] >= self.flush_s:
                handle.flush()
                self._flushed_s[peer] = time.monotonic()

    def frame(self, peer: str, frame: Any, now_s: float) -> None:
        """Keep `frame` as the peer's next PNG unless one was kept less than
        RECORD_PNG_INTERVAL_S ago by `now_s` (any clock, in seconds). Needs OpenCV."""
        with self._lock:
            if self._closed:
                return
            count, last_s = self._pictures.get(peer, (0, -math.inf))
            if now_s - last_s < RECORD_PNG_INTERVAL_S:
                return
            path = self.folder / f"{self._stem(peer)}-{count + 1}.png"
            self._pictures[peer] = (count + 1, now_s)
        if not _cv2().imwrite(str(path), frame):    # slow (~10 ms): outside the lock
            log.warning("could not write %s", path)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            wavs, self._wavs = self._wavs, {}
        for handle, writer in wavs.values():
            writer.close()              # a file object passed to wave stays ours to close
            handle.close()


# =============================================================================
# 13. CONNECTIONS: Link (framed TCP, three lanes, one writer) and UDP sockets
# =============================================================================
# What the host and the client core both talk through. A Link owns one TCP
# connection: what arrives goes through its Wire (WIRE PROTOCOL) and waits,
# as events, until the owner asks for it; what the owner sends waits in one
# of three bounded lanes, urgent (control and chat) before media (relayed
# call packets) before bulk (file data), and a single writer task writes
# it, so frames never interleave and a chat line overtakes media and files.
# It knows nothing of rooms, files or calls, and never decides who is too
# slow: it reports, its owner decides. UdpSocket, for call media, is here
# too: a socket with a receiving thread of its own, off the loop. So is what
# makes a connection TLS and checks whose it is: the host's key (HostKey),
# fingerprints, and the keys a client has pinned (KnownHosts).
#
# Rules it keeps: every lane has a limit (`outbox_limit_bytes` for urgent,
# `media_lane_bytes` for media, which drops its oldest packet rather than
# wait, `bulk_high_water` for bulk); when the transport's own buffer is full
# the writer waits (backpressure stays with this peer); when too many
# received events wait unhandled, reading pauses; a graceful close that the
# peer does not take within `close_timeout_s` becomes an abort.


class LinkProtocol(asyncio.Protocol):
    """asyncio's callbacks for one connection, forwarded to its Link.

    A Protocol rather than asyncio streams: received data goes straight to
    the frame decoder, which slices file data out of it without copying.
    """

    def __init__(self, on_open: Callable[[LinkProtocol, asyncio.Transport], None]
                 | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.link: Link | None = None
        self._on_open = on_open
        self._early: list[bytes] = []       # data that came before attach()
        self._lost_early = False            # ... and the end of it

    def attach(self, link: Link) -> None:
        self.link = link
        for data in self._early:
            link._data_received(data)
        self._early = []
        if self._lost_early:
            link._connection_lost()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)   # TCP: always
        if self._on_open is not None:
            self._on_open(self, self.transport)

    def data_received(self, data: bytes) -> None:
        if self.link is None:
            self._early.append(data)
        else:
            self.link._data_received(data)

    def eof_received(self) -> bool:
        self.data_received(b"")
        # Keep writing: the Link closes when done. asyncio's TLS can't
        # half-close (it closes whatever we answer, and warns if True).
        return self.transport is None or self.transport.get_extra_info("ssl_object") is None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.link is not None:
            self.link._connection_lost()
        else:
            self._lost_early = True

    def pause_writing(self) -> None:
        if self.link is not None:
            self.link._can_write.clear()

    def resume_writing(self) -> None:
        if self.link is not None:
            self.link._can_write.set()


class Link:
    """One framed connection: a Wire, three bounded outboxes, one writer task.

    Control and text frames go to the urgent lane; relayed media to the
    media lane, written when the urgent lane is empty; file data to the
    bulk lane, written when both are empty, so a chat line overtakes a file.
    Only the writer task writes to the transport, so frames never
    interleave, and it waits whenever the transport's buffer is full, so
    backpressure stays with this peer. Incoming frames are decoded
    as they arrive and wait for `receive()`; when too much waits, reading
    pauses. Create it inside a running loop, then `protocol.attach(link)`.
    """

    def __init__(self, wire: Wire, transport: asyncio.Transport, limits: Limits,
                 name: str) -> None:
        self.wire = wire
        self.transport = transport
        self.limits = limits
        self.name = name                    # "ip:port", for logs and task names
        self.peer_key = peer_fingerprint(transport)     # "" unless TLS with a certificate
        self.heard_anything = False         # a byte came from the peer
        transport.set_write_buffer_limits(high=limits.transport_high_water)
        loop = asyncio.get_running_loop()
        self.last_heard = loop.time()       # last byte received
        self.last_progress = loop.time()    # last time an outbox got shorter
        self.queued_bytes = 0               # in the urgent lane
        self.bulk_bytes = 0                 # in the bulk lane
        self.media_bytes = 0                # in the media lane
        self.media_dropped = 0              # media frames dropped to make room
        self.closing = False                # no new frames are accepted
        self.close_reason = ""
        self._urgent: collections.deque[bytes] = collections.deque()
        self._bulk: collections.deque[tuple[bytes, Any]] = collections.deque()
        self._media: collections.deque[bytes] = collections.deque()
        self._wakeup = asyncio.Event()
        self._urgent_room = asyncio.Event()  # set when the urgent lane got shorter
        self._bulk_room = asyncio.Event()   # set while the bulk lane takes more
        self._bulk_room.set()
        self._can_write = asyncio.Event()   # cleared while the transport is full
        self._can_write.set()
        self._incoming: collections.deque[Event] = collections.deque()
        self._incoming_bytes = 0
        self._arrived = asyncio.Event()     # set when `receive` has something to say
        self._reading_paused = False
        self._eof = False                   # the peer finished (or vanished)
        self._lost = False                  # the transport is gone
        self._error: RemoteError | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        self.writer_task = loop.create_task(self._write_loop(), name=f"outbox:{name}")
        log_failure(self.writer_task, f"writing to {name}")

    # --- sending ---

    def offer(self, event: Event, frame: bytes | None = None) -> bool:
        """Queue `event` in the urgent lane without waiting (`frame`: its
        bytes, if already encoded).

        Returns False, queuing nothing, when the link no longer accepts
        frames (see `accepting`) or the urgent lane would pass its limit:
        then, if it still accepts, this peer can't keep up.
        """
        if not self.accepting:
            return False
        if frame is None:
            frame = encode(event)
        if self.queued_bytes + len(frame) > self.limits.outbox_limit_bytes:
            return False
        self.wire.check_send(event)
        self._push(frame)
        return True

    @property
    def accepting(self) -> bool:
        """Can frames still be queued? Not once closing, nor once the peer
        has ended its side (its Wire is CLOSED before its session notices)."""
        return not self.closing and self.wire.state is not State.CLOSED

    def offer_chunk(self, transfer: int, data: Any) -> None:
        """Queue file data (at most MAX_CHUNK_BYTES) in the bulk lane.

        The caller keeps the lane bounded by awaiting `bulk_room()` before
        each batch. Does nothing once the link is closing.
        """
        if not self.accepting:
            return
        self.wire.check_send(_CHUNK_PROBE)
        if not self._urgent and not self._bulk:
            self.last_progress = asyncio.get_running_loop().time()
        self._bulk.append((chunk_header(transfer, len(data)), data))
        self.bulk_bytes += len(data) + _CHUNK_HEADER.size
        if self.bulk_bytes >= self.limits.bulk_high_water:
            self._bulk_room.clear()
        self._wakeup.set()

    def offer_media(self, event: MediaData) -> None:
        """Queue a relayed media packet in the media lane, written after chat
        and before file data. When the lane is full the oldest packet goes:
        late media is worth less than the newest, and never delays chat. For
        the same reason a packet the protocol no longer allows (we have said
        Bye; a call's threads may still relay a few) is dropped, not an error."""
        if not self.accepting or not self.wire.allows(event):
            return
        frame = encode(event)
        self.wire.check_send(event)
        self._media.append(frame)
        self.media_bytes += len(frame)
        while self.media_bytes > self.limits.media_lane_bytes and len(self._media) > 1:
            self.media_bytes -= len(self._media.popleft())
            self.media_dropped += 1
        self._wakeup.set()

    def offer_after_bulk(self, event: Event) -> None:
        """Queue a control event behind the file data already queued (a
        FileEnd must not overtake the last chunks of its file)."""
        if not self.accepting:
            return
        self.wire.check_send(event)
        self._bulk.append((encode(event), b""))
        self.bulk_bytes += _CHUNK_HEADER.size
        self._wakeup.set()

    async def bulk_room(self) -> bool:
        """Wait until the bulk lane can take more. False if the link closed."""
        await self._bulk_room.wait()
        return not self.closing

    async def offer_when_room(self, event: Event) -> bool:
        """Queue `event` in the urgent lane, waiting while it is full (for a
        sender that would rather wait than be refused: our own typing).
        False, queuing nothing, once the link no longer accepts frames."""
        while not self.offer(event):
            if not self.accepting:
                return False
            self._urgent_room.clear()
            await self._urgent_room.wait()  # the writer took some, or we closed
        return True

    def _push(self, frame: bytes) -> None:
        if not self._urgent and not self._bulk:
            self.last_progress = asyncio.get_running_loop().time()
        self._urgent.append(frame)
        self.queued_bytes += len(frame)
        self._wakeup.set()

    def close_with(self, event: Event | None, reason: str) -> None:
        """Send `event` (if any) after what is queued, then close gracefully.

        A peer that does not take the bytes within `close_timeout_s` is cut
        off. Safe to call more than once; the first reason is kept.
        """
        if self.closing:
            return
        self.closing = True
        self.close_reason = reason
        self._drop_bulk()
        if event is not None:
            try:
                self._push(self.wire.send(event))  # past the limit: it's the last one
            except LocalError:
                pass                        # nothing more may be said: just close
        self._wakeup.set()
        self._abort_timer = asyncio.get_running_loop().call_later(
            self.limits.close_timeout_s, self.abort, reason)

    def abort(self, reason: str = "aborted") -> None:
        """Drop the connection now, discarding what is queued."""
        if not self.closing:
            self.closing = True
            self.close_reason = reason
        self._urgent.clear()
        self.queued_bytes = 0
        self._drop_bulk()
        self._wakeup.set()
        self.transport.abort()

    def _drop_bulk(self) -> None:
        self._bulk.clear()
        self.bulk_bytes = 0
        self._media.clear()
        self.media_bytes = 0
        self._bulk_room.set()               # wake producers: they see `closing`

    async def _write_loop(self) -> None:
        transport = self.transport
        try:
            while not self._lost:
                if self._urgent:
                    batch, size = [], 0
                    while self._urgent and size < self.limits.write_batch_bytes:
                        frame = self._urgent.popleft()
                        batch.append(frame)
                        size += len(frame)
                    transport.writelines(batch)
                    self.queued_bytes -= size
                    self._urgent_room.set()
                elif self._media:
                    batch = list(self._media)
                    self._media.clear()
                    self.media_bytes = 0
                    transport.writelines(batch)
                elif self._bulk:
                    batch, size = [], 0
                    while self._bulk and size < self.limits.write_batch_bytes \
                            and not self._urgent:
                        header, data = self._bulk.popleft()
                        batch += (header, data)
                        size += len(header) + len(data)
                    transport.writelines(batch)
                    self.bulk_bytes = max(0, self.bulk_bytes - size)
                    if self.bulk_bytes < self.limits.bulk_high_water // 2:
                        self._bulk_room.set()
                elif self.closing:
                    break
                else:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                self.last_progress = asyncio.get_running_loop().time()
                await self._can_write.wait()    # the transport has room again
        finally:
            if self._abort_timer is not None:
                self._abort_timer.cancel()
            if not self.closing:            # the writer ended first (a write failed)
                self.close_reason = "connection lost"
            self.closing = True
            self._drop_bulk()
            self._urgent_room.set()         # wake a waiting sender: it sees `closing`
            transport.close()               # flushes what the transport holds

    # --- receiving ---

    def _data_received(self, data: bytes) -> None:
        self.last_heard = asyncio.get_running_loop().time()
        self.heard_anything = self.heard_anything or bool(data)
        if self._error is not None or self._eof:
            return
        self._eof = not data
        try:
            events = self.wire.receive(data)
        except RemoteError as exc:          # at EOF: the peer stopped inside a frame
            self._error = exc
            self._arrived.set()
            if not self._lost and not self._eof:
                self.transport.pause_reading()
            return
        for event in events:
            self._incoming.append(event)
            if type(event) is Chunk:
                self._incoming_bytes += len(event.data)
        self._arrived.set()
        if not self._reading_paused and not self._lost and (
                self._incoming_bytes > self.limits.incoming_limit_bytes
                or len(self._incoming) > self.limits.incoming_limit_events):
            self._reading_paused = True     # the consumer is behind: stop reading
            self.transport.pause_reading()

    @property
    def at_eof(self) -> bool:
        """The peer has finished or vanished (what was received may remain)."""
        return self._eof or self._lost

    def _connection_lost(self) -> None:
        if not self._eof and self._error is None:
            self._data_received(b"")        # a half frame left is an error
        self._lost = True
        if not self.closing:                # the peer went before anyone closed: say so
            self.close_reason = "connection lost"
        self.closing = True
        self._can_write.set()               # wake everyone who waits on the peer
        self._arrived.set()
        self._wakeup.set()
        self._bulk_room.set()
        self._urgent_room.set()

    async def receive(self) -> list[Event] | None:
        """The next events from the peer, in order; None at end of stream.

        Raises RemoteError if the peer broke the protocol (after the events
        that came before the breakage have been returned).
        """
        while not self._incoming:
            if self._error is not None:
                raise self._error
            if self._eof:
                return None
            self._arrived.clear()
            await self._arrived.wait()
        events = list(self._incoming)
        self._incoming.clear()
        self._incoming_bytes = 0
        if self._reading_paused and not self._lost:
            self._reading_paused = False
            self.transport.resume_reading()
        return events

    async def finish(self) -> None:
        """Close (if nobody has yet) and wait for the writer to end, aborting
        the connection if the peer won't take the last bytes in time."""
        if not self.closing:
            self.close_with(None, "closed")
        done, _ = await asyncio.wait({self.writer_task},
                                     timeout=self.limits.close_timeout_s)
        if not done:
            self.abort(self.close_reason)
            await asyncio.wait({self.writer_task})


_CHUNK_PROBE = Chunk(1, b"")                # what check_send needs to know: the type


# --- Connecting to the first of several addresses ------------------------------
# A host may have several addresses (a second subnet, a VPN, a Docker
# bridge, IPv6) and only some of them reach us. Happy eyeballs (RFC 8305,
# simplified): try them in the order given, each `stagger_s` after the one
# before or at once when one fails; the first connection wins, the others
# are cancelled (a late one is closed). Logging in happens on the winner
# alone: two logins with one User ID would refuse each other.

HAPPY_EYEBALLS_S = 0.25             # RFC 8305's "connection attempt delay"


async def connect_first(addresses: Sequence[str], connect: Callable[[str], Awaitable[Any]],
                        timeout_s: float, stagger_s: float = HAPPY_EYEBALLS_S
                        ) -> tuple[str, Any]:
    """(address, what `connect(address)` returned) for the first address
    that connects. When every one fails, raises the error of the first
    address (the likeliest one, so its reason is the telling one); after
    `timeout_s`, TimeoutError."""
    if not addresses:
        raise OSError(errno.EHOSTUNREACH, "no address to try")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    attempts: dict[asyncio.Task, str] = {}
    failures: dict[str, BaseException] = {}
    waiting = list(addresses)
    winner: asyncio.Task | None = None
    try:
        while winner is None:
            if waiting:
                address = waiting.pop(0)
                attempts[asyncio.ensure_future(connect(address))] = address
            pending = [task for task in attempts if not task.done()]
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"no address answered within {timeout_s:g} s")
            if not pending:
                if waiting:
                    continue                # that one failed at once: the next now
                raise next(failures[a] for a in addresses if a in failures)
            done, _ = await asyncio.wait(pending, timeout=min(stagger_s, left) if waiting
                                         else left, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = task.exception()
                if error is not None:
                    failures[attempts[task]] = error
                elif winner is None:
                    winner = task
        return attempts[winner], winner.result()
    finally:
        for task in attempts:
            if not task.done():
                task.cancel()
            elif task is not winner and not task.cancelled() and task.exception() is None:
                _close_connected(task.result())     # a second one that also made it


def _close_connected(result: Any) -> None:
    """Close what a losing attempt connected: a (transport, protocol) pair."""
    transport = result[0] if isinstance(result, tuple) and result else None
    if transport is not None and hasattr(transport, "close"):
        transport.close()


# --- Why a connection failed, in words for a person ---------------------------

def firewall_hint(port: int) -> str:
    """A host that answered mDNS but not on its port: the usual cause, and fixes."""
    return (f". It answered on the LAN, so it is running, but its TCP port {port} takes no "
            "connections: most likely a firewall on that computer. There, allow chatroom "
            f"in: Windows, Windows Defender Firewall (or TCP port {port}); macOS, System "
            "Settings > Network > Firewall > Options; Linux, `sudo ufw allow "
            f"{port}/tcp` or `sudo firewall-cmd --add-port={port}/tcp`")


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def why_unreachable(exc: BaseException, waited_s: float) -> str:
    """A connection that failed, in words for a person (not "Connect call
    failed ('127.0.0.1', 1)")."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {waited_s:g} s"
    if isinstance(exc, socket.gaierror):
        return "no such host name on this network"
    if isinstance(exc, ConnectionRefusedError):
        return "nothing is listening there (is the host running, on that port?)"
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "that address can't be reached from this network"
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) \
        or type(exc).__name__


# --- TLS: the host's key, fingerprints, and the hosts a client knows -----------
# Every connection is TLS 1.3 unless both ends were started with --insecure.
# The host proves nothing to a certificate authority: it makes an ECDSA
# P-256 key and a self-signed certificate on its first start and keeps them
# (--state-dir), and its fingerprint, the SHA-256 of the certificate's
# public key (SPKI, so a renewed certificate with the same key keeps its
# pin), is what people compare and clients pin. A client accepts any
# certificate in the handshake and then checks that fingerprint against
# its known hosts (KnownHosts) before it says a word: trust on first use,
# as ssh does, and a changed key is refused until accepted on purpose.

HOST_KEY_FILE = "host-key.pem"      # the host's private key, owner-only
HOST_CERT_FILE = "host-cert.pem"
KNOWN_HOSTS_FILE = "known-hosts.json"
CERT_VALID_DAYS = 10 * 365          # the pin is the key's: a renewal keeps it
FINGERPRINT_SHOWN_BYTES = 16        # shown to people; pins keep all 32


def _der_element(data: bytes, offset: int) -> tuple[int, int, int]:
    """(tag, start of content, end) of the DER element at `offset`;
    ValueError if it doesn't fit in `data` (a peer's certificate is
    untrusted bytes)."""
    if offset + 2 > len(data):
        raise ValueError("truncated DER")
    tag, first = data[offset], data[offset + 1]
    start = offset + 2
    if first < 0x80:
        size = first
    else:
        count = first & 0x7F
        if not 1 <= count <= 4 or start + count > len(data):
            raise ValueError("bad DER length")
        size = int.from_bytes(data[start:start + count], "big")
        start += count
    if start + size > len(data):
        raise ValueError("truncated DER")
    return tag, start, start + size


def certificate_spki(der: bytes) -> bytes:
    """The SubjectPublicKeyInfo (DER) of an X.509 certificate (DER), with
    the standard library alone (RFC 5280 4.1: tbsCertificate holds an
    optional [0] version, then serial, signature, issuer, validity and
    subject, then subjectPublicKeyInfo). ValueError if malformed."""
    tag, start, _end = _der_element(der, 0)
    tag_tbs, at, end = _der_element(der, start)
    if tag != 0x30 or tag_tbs != 0x30:
        raise ValueError("not a certificate")
    skip = 5                                # serial, signature, issuer, validity, subject
    if at < end and der[at] == 0xA0:
        skip += 1                           # the version
    for _ in range(skip):
        at = _der_element(der, at)[2]
    tag, _start, stop = _der_element(der, at)
    if tag != 0x30 or stop > end:
        raise ValueError("no public key in the certificate")
    return der[at:stop]


def fingerprint_of(certificate_der: bytes) -> str:
    """A certificate's key fingerprint: 64 upper-case hex digits."""
    return hashlib.sha256(certificate_spki(certificate_der)).hexdigest().upper()


def show_fingerprint(fingerprint: str, full: bool = False) -> str:
    """A fingerprint as people compare it: "3F2A 9C01 ..." (its first
    FINGERPRINT_SHOWN_BYTES, or all of it with `full`)."""
    digits = fingerprint if full else fingerprint[:2 * FINGERPRINT_SHOWN_BYTES]
    return " ".join(digits[i:i + 4] for i in range(0, len(digits), 4))


class HostKey:
    """The host's TLS identity: key and certificate files and the key's
    fingerprint. `load_or_create(folder)` reads them, or makes them on a
    first start (`cryptography` is needed then, only then)."""

    def __init__(self, key_path: Path, cert_path: Path, fingerprint: str) -> None:
        self.key_path = key_path
        self.cert_path = cert_path
        self.fingerprint = fingerprint

    @classmethod
    def load_or_create(cls, folder: Path, name: str = "chatroom host") -> HostKey:
        """The key kept in `folder`, made there first if missing. OSError
        if the folder can't be written; MissingPackage without cryptography
        for a first start; ValueError for a damaged certificate file."""
        key_path, cert_path = folder / HOST_KEY_FILE, folder / HOST_CERT_FILE
        if not (key_path.exists() and cert_path.exists()):
            key_pem, cert_pem = _make_certificate(name)
            write_private(key_path, key_pem)
            write_private(cert_path, cert_pem)
            log.info("made a new host key in %s", folder)
        der = ssl.PEM_cert_to_DER_cert(cert_path.read_text(encoding="ascii"))
        return cls(key_path, cert_path, fingerprint_of(der))

    def server_context(self) -> ssl.SSLContext:
        """TLS 1.3 only, this key and certificate."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(self.cert_path, self.key_path)
        return context


def _make_certificate(name: str) -> tuple[bytes, bytes]:
    """(key PEM, self-signed certificate PEM): ECDSA P-256, which every TLS
    1.3 stack takes."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        raise MissingPackage("cryptography", "Making the host's TLS key") from None
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (name or "chatroom")[:64])])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=CERT_VALID_DAYS))
                   .sign(key, hashes.SHA256()))
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
            certificate.public_bytes(serialization.Encoding.PEM))


def client_context() -> ssl.SSLContext:
    """TLS 1.3 only; any certificate passes the handshake, because the
    pin (KnownHosts), not a certificate authority, decides whom we trust."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def peer_fingerprint(transport: asyncio.BaseTransport) -> str:
    """The fingerprint of the key a TLS transport's peer showed ("" for
    plain TCP, or no certificate)."""
    ssl_object = transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    try:
        return fingerprint_of(der) if der else ""
    except ValueError:
        return ""


def name_label(name: str) -> str:
    """The known-hosts label of a host found by its advertised name."""
    return f"name:{id_key(name)}"


class KnownHosts:
    """The hosts a client has met: label -> fingerprint, a small JSON file
    (--known-hosts, default in the config folder), owner-only.

    A label is how we found the host: `name:<name>` for the name it
    advertises (on mDNS, and in its welcome), which survives a new DHCP
    address, or `address:port` as typed after --server. `check` is pure;
    `save` writes the file and belongs on a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.dirty = False                  # pins changed since the file was written
        self._changed: dict[str, str] = {}  # what this process pinned
        self.pins: dict[str, str] = self._read()

    def _read(self) -> dict[str, str]:
        """The pins in the file ({} if missing; a damaged file is ignored)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring the known hosts in %s: %s", self.path, _why(exc))
            return {}
        if type(data) is not dict or type(data.get("hosts")) is not dict:
            return {}
        return {k: v.upper() for k, v in data["hosts"].items() if type(k) is str
                and type(v) is str and re.fullmatch(r"[0-9A-Fa-f]{64}", v)}

    def check(self, label: str, fingerprint: str, accept: str = "") -> tuple[str, str]:
        """(verdict, the fingerprint pinned before) for a host under `label`:
        "known" (the pin matches), "new" (first meeting: pinned now),
        "accepted" (a changed key that `accept` allows: "*" any, or this
        fingerprint; pinned now) or "changed" (refuse it)."""
        pinned = self.pins.get(label, "")
        if pinned == fingerprint:
            return "known", pinned
        if pinned and accept not in ("*", fingerprint):
            return "changed", pinned
        self.pins[label] = self._changed[label] = fingerprint
        return ("accepted" if pinned else "new"), pinned

    def verify(self, labels: Sequence[str], fingerprint: str,
               accept: str = "") -> tuple[bool, list[dict]]:
        """Check a host's key under each of its labels: (trusted?, the
        events to say). A first meeting pins it (`host_key`, status
        "new"), as does a change `accept` allows ("accepted"); any other
        change is refused: `error{host_key_changed}` with both keys and
        how to accept the new one on purpose. `dirty` says a save is due."""
        events: list[dict] = []
        for label in labels:
            verdict, old = self.check(label, fingerprint, accept)
            who = (f'the host "{label[5:]}"' if label.startswith("name:")
                   else f"the host at {label}")
            if verdict == "changed":
                return False, [{
                    "type": "error", "code": "host_key_changed", "host": label,
                    "fingerprint": fingerprint, "old_fingerprint": old,
                    "message": f"REFUSED: THE KEY OF {who.upper()} HAS CHANGED. It was "
                    f"{show_fingerprint(old)} and is now {show_fingerprint(fingerprint)}. "
                    "Someone may be pretending to be that host, or it has a new key "
                    "(a new computer, a reinstall, another --state-dir). Compare the "
                    "new key with the one the host shows; if they match, join again "
                    "with --accept-new-key (in the window: Accept the new key)"}]
            if verdict != "known":
                self.dirty = True
                what = "First meeting with" if verdict == "new" else "Accepted a new key for"
                events.append({"type": "host_key", "status": verdict, "host": label,
                               "fingerprint": fingerprint, "old_fingerprint": old,
                               "message": f"{what} {who}: key {show_fingerprint(fingerprint)}"
                               f", remembered in {self.path}"})
        return True, events

    def save(self) -> None:
        """Write our new pins over what the file holds now (another client
        may have pinned other hosts meanwhile); a thread's job."""
        self.dirty = False
        pins = {**self._read(), **self._changed}
        text = json.dumps({"hosts": dict(sorted(pins.items()))}, indent=1)
        write_private(self.path, text.encode("utf-8"))


# --- UDP sockets for media -----------------------------------------------------

MEDIA_SOCKET_BUFFER_BYTES = 4 * 1024 * 1024  # "unpaced bursts lost 80% without it"
_UDP_POLL_S = 0.25                  # how soon a receiving thread notices close()
_small_buffer_said = False          # a system cap on buffers is logged once a process
_LINUX = sys.platform.startswith("linux")   # Python names neither of these:
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33 if _LINUX else None)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32 if _LINUX else None)


def _grow_buffer(sock: socket.socket, option: int, forced: int | None, size: int) -> int:
    """Ask for a `size`-byte socket buffer (SO_RCVBUF or SO_SNDBUF); where
    the system caps it lower (Linux: net.core.rmem_max, 208 KiB on many
    machines), ask again with the privileged `forced` option (SO_RCVBUFFORCE,
    which needs CAP_NET_ADMIN), and say once in the log what was granted.
    Returns the size the system reports (Linux reports twice what it keeps)."""
    global _small_buffer_said
    sock.setsockopt(socket.SOL_SOCKET, option, size)
    granted = sock.getsockopt(socket.SOL_SOCKET, option)
    if granted < size and forced is not None:
        with contextlib.suppress(OSError):      # not privileged: the cap stays
            sock.setsockopt(socket.SOL_SOCKET, forced, size)
            granted = sock.getsockopt(socket.SOL_SOCKET, option)
    if granted < size and not _small_buffer_said:
        _small_buffer_said = True
        log.warning("media socket buffers are %d KiB, not the %d KiB asked for: bursts "
                    "of video may be lost (on Linux, raise net.core.rmem_max and "
                    "net.core.wmem_max)", granted // 1024, size // 1024)
    return granted


class UdpSocket:
    """One UDP socket for call media: a thread of its own receives, and any
    thread may send. Media must not wait for the core's loop (nor chat for
    media), so this socket is not on the loop at all.

    `on_packet(data, address)` runs on the receiving thread for every
    datagram; it must be quick and must not raise. Errors an ICMP message
    leaves on a UDP socket (a peer that went away) are counted and ignored.
    Sending never waits: a datagram the system can't take at once is dropped
    and counted, so one peer's full path can't hold up the others' media.
    """

    def __init__(self, bind: str, port: int,
                 on_packet: Callable[[bytes, Any], None], name: str) -> None:
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.receive_buffer = _grow_buffer(
                self.sock, socket.SO_RCVBUF, SO_RCVBUFFORCE, MEDIA_SOCKET_BUFFER_BYTES)
            _grow_buffer(self.sock, socket.SO_SNDBUF, SO_SNDBUFFORCE, MEDIA_SOCKET_BUFFER_BYTES)
            self.sock.bind((bind, port))    # OSError (a port in use) goes to the caller
        except OSError:
            self.sock.close()
            raise
        self.sock.settimeout(_UDP_POLL_S)
        # The receiving side waits with a timeout, and Python applies a socket's
        # timeout to sendto too (it waits for room, then retries): sends go
        # through a duplicate that never waits.
        self._sender = self.sock.dup()
        self._sender.setblocking(False)
        self.port: int = self.sock.getsockname()[1]
        # close() wakes the receiving thread with an empty datagram to itself.
        self._wake_to = (bind if bind not in ("0.0.0.0", "::") else
                         "::1" if family == socket.AF_INET6 else "127.0.0.1", self.port)
        self.on_packet = on_packet
        self.received = 0
        self.sent = 0
        self.errors = 0                     # sends refused, ICMP errors
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, name=f"udp:{name}:{self.port}",
                                        daemon=True)
        self._thread.start()

    def send(self, data: bytes, address: tuple[str, int]) -> None:
        """Send one datagram now; a failure is counted, never raised (the
        link's silence timer is what notices a dead peer)."""
        try:
            self._sender.sendto(data, address)
            self.sent += 1
        except OSError:                     # BlockingIOError included: dropped
            self.errors += 1

    def _receive(self) -> None:
        try:
            while not self._closed.is_set():
                try:
                    data, address = self.sock.recvfrom(65536)
                except TimeoutError:
                    continue
                except OSError:
                    self.errors += 1        # ICMP port unreachable and such
                    continue
                if self._closed.is_set():
                    break
                self.received += 1
                try:
                    self.on_packet(data, address)
                except Exception:           # a bug: log it, keep the call going
                    log.exception("handling a media packet failed")
        finally:
            self.sock.close()               # here: the fd is never reused under us
            self._sender.close()

    def close(self, wait: bool = False) -> None:
        """Stop receiving; the receiving thread closes the socket as it ends,
        at once (it is woken), or with `wait`, before this returns. Never
        blocks the caller otherwise: the core's loop calls it."""
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(OSError):
            self.sock.sendto(b"", self._wake_to)
        if wait and threading.current_thread() is not self._thread:
            self._thread.join(2 * _UDP_POLL_S + 1)


# =============================================================================
# 14. HOST RELAYS: files and calls between the members of a room
# =============================================================================
# The host's two relays, each one object beside the host (next section),
# which hands them their events and tells them when a session goes:
# HostFiles moves files from a sender to recipients at each one's pace, and
# HostCalls arranges calls and passes on media that UDP can't carry. Each
# answers through the host's `deliver` and never touches a socket itself,
# only the Links the host gave its sessions.


class Peer(Protocol):
    """What the relays know of one of the host's members (its seat): its
    connection now. Otherwise a handle, as members are to ROOMS."""
    @property
    def link(self) -> Link: ...


@dataclasses.dataclass
class PeerFiles:
    """The files one peer is sending and receiving through the host."""
    uploads: dict[int, Upload] = dataclasses.field(default_factory=dict)   # its numbers
    downloads: dict[int, Relay] = dataclasses.field(default_factory=dict)  # our numbers
    next_download: int = 0
    asks: bool = False                  # its hello said `ask`: files wait for its word


# --- File relay --------------------------------------------------------------
# HostFiles owns the host's side of files: the uploads coming in, the relays
# going out, the spool folder and the threads that write it. The host hands
# it every file event (its dispatch table says which) and tells it when a
# session goes; HostFiles answers through the host's `deliver`, so rooms and
# sessions never learn how a file moves.

class UploadState(enum.Enum):
    RECEIVING = "receiving"         # data is arriving from the sender
    COMPLETE = "complete"           # every byte arrived, the size matched
    FAILED = "failed"               # it ended without the file (see `failure`)


class RelayState(enum.Enum):
    ASKING = "asking"               # offered to one who asks first: no data until it takes it
    SENDING = "sending"             # handing the file to the recipient's link
    SENT = "sent"                   # sent all it will send; awaiting the answer
    FINISHED = "finished"           # the recipient saved it, refused it, or left


# (state, what happened) -> the next state. A pair not listed does not move:
# it is late or repeated news (a failure after the end, a second answer).
UPLOAD_MOVES: dict[tuple[UploadState, str], UploadState] = {
    (UploadState.RECEIVING, "ended"): UploadState.COMPLETE,
    (UploadState.RECEIVING, "failed"): UploadState.FAILED,
}
RELAY_MOVES: dict[tuple[RelayState, str], RelayState] = {
    (RelayState.ASKING, "wanted"): RelayState.SENDING,      # FileAccept
    (RelayState.ASKING, "answered"): RelayState.FINISHED,   # declined, cancelled, left
    (RelayState.ASKING, "resumed"): RelayState.SENDING,     # going on is taking it
    (RelayState.SENDING, "sent"): RelayState.SENT,
    (RelayState.SENDING, "answered"): RelayState.FINISHED,
    (RelayState.SENT, "answered"): RelayState.FINISHED,
    (RelayState.SENDING, "resumed"): RelayState.SENDING,    # its recipient is back
    (RelayState.SENT, "resumed"): RelayState.SENDING,
}


class Upload:
    """A file coming into the host from one session, on its way to recipients.

    Recent data stays in memory, in a window of `relay_window_bytes` (up to
    `relay_window_max_bytes` while recipients drift apart), and every
    recipient that keeps up is served from there. A chunk leaves the window
    when no recipient needs it any more; or, once the window is at its
    largest and the leading recipient keeps up while another lags, after it
    has been written to a spool file, from which the laggard catches up at
    its own pace. When every recipient is behind, the sender is paused
    instead: spilling then would cost a disk write and read for nothing. So
    a slow recipient never slows the others (a plain relay would hold
    everyone to the slowest, or buffer without bound), nothing touches the
    disk unless recipients drift apart, and memory stays flat whatever the
    file's size.

    What a recipient has not confirmed on its disk (FileGot) is never
    forgotten: it stays in the window, or goes to the spool file, so a
    recipient that drops and comes back resumes from what it has. A sender
    that drops keeps its upload (its seat is held); it sends the rest from
    `received` when it is back.
    """

    def __init__(self, files: HostFiles, sender: Peer, offer: FileOffer,
                 sender_name: str) -> None:
        self.files = files
        self.limits = files.limits
        self.sender: Peer | None = sender    # None once the sender has left
        self.offer = offer
        self.sender_name = sender_name
        self.state = UploadState.RECEIVING
        self.received = 0                   # bytes taken from the network
        self.sha256 = ""                    # as the sender announced it, at the end
        self.failure: FileAbort | None = None   # why the upload failed, if it did
        self.relays: list[Relay] = []
        self.window: collections.deque[Any] = collections.deque()  # chunks in memory
        self.window_bytes = 0
        self.base_offset = 0                # file offset of window[0]
        self.spool_path = ""                # made when something must be spilled
        self._spool: Any = None             # its write handle (in the io thread)
        self.readers = 1                    # the evicting task and each relay
        self._over = asyncio.Event()        # the window is over its size
        self._room = asyncio.Event()        # the sender may go on
        self._room.set()
        self._grew = asyncio.Event()        # set when data arrives or it ends
        self._moved = asyncio.Event()       # set when a relay advances or ends
        self.task = asyncio.get_running_loop().create_task(
            self._evict(), name=f"upload:{sender.link.name}:{offer.transfer}")
        log_failure(self.task, f"relaying {offer.name!r}")

    def _move(self, what: str) -> bool:
        """Take the lifecycle step `what`; False if it doesn't apply now."""
        state = UPLOAD_MOVES.get((self.state, what))
        if state is None:
            return False
        self.state = state
        return True

    def add(self, data: Any) -> Any:
        """Take one chunk; returns an awaitable when the sender must wait."""
        if self.state is not UploadState.RECEIVING or self.sha256 or not data:
            return None
        if self.received + len(data) > self.offer.size:
            self.fail("bad_frame", "more data than the offer announced")
            return None
        self.received += len(data)
        self.window.append(data)
        self.window_bytes += len(data)
        self._wake()
        if self.window_bytes > self.limits.relay_window_bytes:
            self._over.set()
            if self.window_bytes > self.limits.relay_window_max_bytes:
                self._room.clear()
                self._moved.set()           # the evicting task looks again: spill?
                return self._room.wait()
        return None

    def end(self, sha256: str) -> None:
        """The sender says all data is sent, and what its hash is."""
        if self.state is not UploadState.RECEIVING or self.sha256:
            return
        self.sha256 = sha256
        if self.received != self.offer.size:
            self.fail("bad_frame", f"the sender sent {self.received} of "
                      f"{self.offer.size} bytes")
            return
        self._move("ended")
        self._wake()
        self._over.set()                    # the evicting task may finish now
        self.tell_sender(FileStored(self.offer.transfer))

    def needs(self, end: int) -> bool:
        """Might a recipient still need bytes before file offset `end`: bytes
        it has not confirmed having (a resume starts there)?"""
        return any(relay.state is not RelayState.FINISHED and relay.acked < end
                   for relay in self.relays)

    def leader_keeps_up(self) -> bool:
        """Is some recipient within a window of the newest data, or is every
        recipient away (then what they need goes to disk, not the sender
        waiting for them)?"""
        behind = self.received - self.limits.relay_window_bytes
        active = [relay for relay in self.relays if relay.active]
        return not active or any(relay.offset >= behind for relay in active)

    def data_from(self, offset: int, limit: int) -> list[Any]:
        """Up to about `limit` bytes from file offset `offset` (at least
        `base_offset`), as they are in the window: the first chunk cut to
        start at `offset`."""
        out: list[Any] = []
        position, size = self.base_offset, 0
        for chunk in self.window:
            end = position + len(chunk)
            if end > offset:
                out.append(memoryview(chunk)[max(0, offset - position):])
                size += len(out[-1])
                if size >= limit:
                    break
            position = end
        return out

    def relay_moved(self) -> None:
        self._moved.set()

    async def _evict(self) -> None:
        """Keep the window near its size, spilling what someone still needs."""
        loop = asyncio.get_running_loop()
        limits = self.limits
        try:
            while self.state is not UploadState.FAILED:
                await self._over.wait()
                while self.window_bytes > limits.relay_window_bytes and \
                        self.state is not UploadState.FAILED:
                    count, size = 0, 0
                    for chunk in self.window:
                        if size >= limits.file_io_bytes:
                            break
                        count += 1
                        size += len(chunk)
                    if self.needs(self.base_offset + size):
                        if self.window_bytes < limits.relay_window_max_bytes or \
                                not self.leader_keeps_up():  # wait for the relays
                            self._moved.clear()
                            await self._moved.wait()
                            continue
                        batch = list(itertools.islice(self.window, count))
                        await loop.run_in_executor(self.files.io, self._spill,
                                                   self.base_offset, batch)
                    if self.state is UploadState.FAILED:
                        break
                    for _ in range(count):
                        self.window.popleft()
                    self.window_bytes -= size
                    self.base_offset += size
                    if self.window_bytes <= limits.relay_window_max_bytes:
                        self._room.set()
                    self._wake()
                self._over.clear()
                if self.state is UploadState.COMPLETE:
                    break
        except OSError as exc:
            code = "disk_full" if exc.errno == errno.ENOSPC else "file_io"
            self.fail(code, f"the host could not keep the file: {exc.strerror}")
        finally:
            self._room.set()
            if self._spool is not None:
                await loop.run_in_executor(self.files.io, self._spool.close)
            self.release()

    def _spill(self, offset: int, chunks: list[Any]) -> None:
        """Write chunks at `offset` of the spool file (io thread)."""
        if self._spool is None:
            handle, self.spool_path = tempfile.mkstemp(prefix="up-",
                                                       dir=self.files.spool_dir)
            self._spool = os.fdopen(handle, "r+b", buffering=0)
        self._spool.seek(offset)
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[self._spool.write(view):]

    def fail(self, code: str, reason: str) -> None:
        """Stop the upload: the sender and every recipient still waiting are told."""
        if not self._move("failed"):
            return                          # complete, or failed already
        self.failure = FileAbort(self.offer.transfer, code, reason)
        self.tell_sender(FileRefuse(self.offer.transfer, code, reason))
        self.window.clear()
        self.window_bytes = 0
        self._over.set()
        self._room.set()
        self._moved.set()
        self._wake()

    def release(self) -> None:
        """One reader (the evicting task or a relay) is done."""
        self.readers -= 1
        if self.readers == 0:
            self.window.clear()
            self.files.forget_upload(self)

    def tell_sender(self, event: Event) -> None:
        if self.sender is not None:
            self.files.deliver([(self.sender, event)])

    def _wake(self) -> None:
        self._grew.set()
        self._grew = asyncio.Event()

    async def grown(self) -> None:
        """Wait until more arrives, the window moves, or the upload ends."""
        await self._grew.wait()


class Relay:
    """One upload going to one recipient, at the recipient's own pace.

    Its task ends with the recipient's connection; the relay itself lives
    on (held, `active` false) until the recipient answers, leaves, or comes
    back and says with FileResume where to go on from (`resume`)."""

    def __init__(self, upload: Upload, recipient: Peer, number: int) -> None:
        self.upload = upload
        self.recipient = recipient
        self.number = number                # the recipient's transfer number
        # A recipient that asks first gets no data until it says FileAccept
        # (or FileResume); until then what it needs is kept like a laggard's.
        self.state = RelayState.ASKING if upload.files.of(recipient).asks else \
            RelayState.SENDING
        self.offset = 0                     # bytes handed to the recipient's link
        self.acked = 0                      # bytes the recipient has on disk (FileGot)
        upload.relays.append(self)
        upload.readers += 1
        self.task = asyncio.get_running_loop().create_task(
            self._run(), name=f"relay:{recipient.link.name}:{number}")
        log_failure(self.task, f"relaying {upload.offer.name!r} to {recipient.link.name}")

    @property
    def active(self) -> bool:
        """Sending now (not finished, not waiting for its recipient to be
        back, nor for its answer)? One that waits is served from the spool
        later: waiting for it would stop reading the sender's connection,
        its chat and its /cancel with it."""
        return self.state is RelayState.SENDING and not self.task.done()

    def answered(self) -> bool:
        """The recipient saved, refused or left: True if that is news (the
        first answer), and then the relay stops sending."""
        state = RELAY_MOVES.get((self.state, "answered"))
        if state is None:
            return False
        self.state = state
        self._finish()
        return True

    def _finish(self) -> None:
        """Done with the upload: it may forget the file once its task is over."""
        self.upload.relay_moved()
        if self.task.done():
            self.upload.release()
        else:
            self.task.cancel()
            self.task.add_done_callback(lambda _: self.upload.release())

    def want(self) -> None:
        """The recipient took the file (FileAccept, or a FileResume): send it."""
        state = RELAY_MOVES.get((self.state, "wanted"))
        if state is not None:
            self.state = state
            self.upload._wake()

    def confirm(self, offset: int) -> None:
        """The recipient has the first `offset` bytes on its disk (FileGot)."""
        if offset > self.acked:
            self.acked = min(offset, self.upload.received)
            self.upload.relay_moved()

    def resume(self, offset: int) -> bool:
        """The recipient is back with `offset` bytes: send the rest. False if
        the host no longer has them (it kept from `acked` on)."""
        upload = self.upload
        state = RELAY_MOVES.get((self.state, "resumed"))
        if state is None or upload.failure is not None or \
                not self.acked <= offset <= upload.received:
            return False
        self.confirm(offset)
        before = self.task
        before.cancel()                     # a connection the resume replaced
        self.state, self.offset = state, offset
        self.task = asyncio.get_running_loop().create_task(
            self._run(announce=False, after=before),
            name=f"relay:{self.recipient.link.name}:{self.number}")
        log_failure(self.task, f"relaying {upload.offer.name!r} to {self.recipient.link.name}")
        return True

    async def _run(self, announce: bool = True, after: asyncio.Task | None = None) -> None:
        if after is not None:
            await asyncio.wait([after])     # its spool handle is closed first
        upload, link, files = self.upload, self.recipient.link, self.upload.files
        offer, limits = upload.offer, upload.limits
        if announce:
            files.deliver([(self.recipient, FileAnnounce(
                self.number, upload.sender_name, offer.name, offer.size, offer.to,
                self.state is RelayState.ASKING))])
        loop = asyncio.get_running_loop()
        spool = None                        # our read handle, once we need the disk
        failed = False
        try:
            while not link.closing:
                if upload.failure is not None:
                    files.deliver([(self.recipient, dataclasses.replace(
                        upload.failure, transfer=self.number))])
                    failed = True
                    return
                if self.state is RelayState.ASKING:     # the recipient has not answered
                    await upload.grown()
                    continue
                if self.offset < upload.received:
                    if not await link.bulk_room():
                        return
                    if self.offset < upload.base_offset:    # fell behind: disk
                        if spool is None:
                            spool = await loop.run_in_executor(
                                files.io, open, upload.spool_path, "rb", 0)
                        want = min(limits.file_io_bytes, upload.base_offset - self.offset)
                        data = memoryview(await loop.run_in_executor(
                            files.io, _read_at, spool, self.offset, want))
                        for start in range(0, len(data), MAX_CHUNK_BYTES):
                            link.offer_chunk(self.number, data[start:start + MAX_CHUNK_BYTES])
                        self.offset += len(data)
                        continue
                    for chunk in upload.data_from(self.offset, limits.file_io_bytes):
                        link.offer_chunk(self.number, chunk)
                        self.offset += len(chunk)
                    upload.relay_moved()
                elif upload.state is UploadState.COMPLETE:
                    link.offer_after_bulk(FileEnd(self.number, upload.sha256))
                    self.state = RELAY_MOVES.get((self.state, "sent"), self.state)
                    return
                else:
                    await upload.grown()
        except OSError as exc:              # the spool vanished: tell, don't crash
            files.deliver([(self.recipient, FileAbort(self.number, "file_io",
                                                      f"the host lost the file: {exc}"))])
            failed = True
        finally:
            upload.relay_moved()
            if spool is not None:
                await loop.run_in_executor(files.io, spool.close)
            if failed and self.state is not RelayState.FINISHED:
                self.state = RelayState.FINISHED    # nobody answers a FileAbort
                upload.release()


def _read_at(handle: Any, offset: int, size: int) -> bytes:
    handle.seek(offset)
    return handle.read(size)


class HostFiles:
    """The host's file relay: uploads, their relays, the spool folder.

    `start()` makes the spool folder and the io threads; `close()` fails
    what is still moving and removes them. The `on_*` methods take one
    file event from a session (the Wire has checked it may come now);
    `forget(session, user)` is called when a session leaves its room.
    """

    def __init__(self, limits: Limits, rooms: Rooms,
                 deliver: Callable[[list[Delivery]], None],
                 spool_parent: str | None = None) -> None:
        self.limits = limits
        self.rooms = rooms                  # read only: who a file goes to
        self.deliver = deliver              # the host's: offer events to sessions
        self._spool_parent = spool_parent   # where our spool folder goes
        self.spool_dir = ""                 # our own folder, made by start()
        self.io: concurrent.futures.ThreadPoolExecutor | None = None   # disk work
        self.uploads: set[Upload] = set()
        self.peers: dict[Peer, PeerFiles] = {}

    def start(self) -> None:
        self.spool_dir = tempfile.mkdtemp(prefix="chatroom-spool-", dir=self._spool_parent)
        self.io = concurrent.futures.ThreadPoolExecutor(self.limits.host_io_threads,
                                                        thread_name_prefix="host-io")

    async def close(self) -> None:
        """Fail every upload still moving, wait (briefly) for their tasks,
        then stop the io threads and remove the spool folder."""
        for upload in list(self.uploads):
            upload.fail("host_shutdown", "the host is shutting down")
        tasks = [t for u in self.uploads for t in [u.task] + [r.task for r in u.relays]]
        if tasks:
            await asyncio.wait(tasks, timeout=self.limits.close_timeout_s)
        self.abandon()

    def abandon(self) -> None:
        """Stop the io threads and remove the spool folder, now."""
        if self.io is not None:
            self.io.shutdown(wait=False, cancel_futures=True)
            self.io = None
        if self.spool_dir:
            shutil.rmtree(self.spool_dir, ignore_errors=True)

    def of(self, peer: Peer) -> PeerFiles:
        """`peer`'s files (made on first use; `forget` drops them)."""
        files = self.peers.get(peer)
        if files is None:
            files = self.peers[peer] = PeerFiles()
        return files

    # --- events from a session ---

    def on_offer(self, session: Peer, offer: FileOffer) -> None:
        def refuse(code: str, reason: str) -> None:
            self.deliver([(session, FileRefuse(offer.transfer, code, reason))])

        limits = self.limits
        mine = self.of(session)
        if offer.transfer in mine.uploads:
            return refuse("bad_frame", f"transfer {offer.transfer} is already in use")
        if len(mine.uploads) >= limits.max_transfers:
            return refuse("busy", f"at most {limits.max_transfers} files at once; wait "
                          "for one to finish")
        if offer.size > limits.max_file_size:
            return refuse("file_too_large", f"the file is {offer.size} bytes; this "
                          f"host takes at most {limits.max_file_size}")
        try:
            recipients = self.rooms.recipients(session, offer.to)
        except Refused as refusal:
            return refuse(refusal.code, refusal.message)
        upload = Upload(self, session, offer, self.rooms.user_of(session) or "?")
        mine.uploads[offer.transfer] = upload
        self.uploads.add(upload)
        for recipient in recipients:
            theirs = self.of(recipient)
            theirs.next_download += 1
            theirs.downloads[theirs.next_download] = Relay(upload, recipient,
                                                           theirs.next_download)
        log.info("%s sends %r (%d bytes) to %d", session.link.name, offer.name,
                 offer.size, len(recipients))
        self.deliver([(session, FileAccept(offer.transfer))])

    def on_chunk(self, session: Peer, chunk: Chunk) -> Any:
        """File data; returns an awaitable when the session must stop
        reading until it completes (the relay's window is full)."""
        upload = self.of(session).uploads.get(chunk.transfer)
        return upload.add(chunk.data) if upload is not None else None  # late: ignore

    def on_end(self, session: Peer, end: FileEnd) -> None:
        upload = self.of(session).uploads.get(end.transfer)
        if upload is not None:
            upload.end(end.sha256)

    def on_abort(self, session: Peer, abort: FileAbort) -> None:
        upload = self.of(session).uploads.pop(abort.transfer, None)
        if upload is None:
            return
        upload.sender = None                # it knows; don't answer its abort
        reason = f"{upload.sender_name} cancelled: {abort.reason}"
        if upload.state is UploadState.COMPLETE:
            # Every byte is here, but recipients still downloading stop too:
            # "either side can cancel a transfer in flight" (README, Files).
            for relay in upload.relays:
                if relay.answered():
                    theirs = self.peers.get(relay.recipient)
                    if theirs is not None:
                        theirs.downloads.pop(relay.number, None)
                    self.deliver([(relay.recipient, FileAbort(relay.number, abort.code,
                                                              reason))])
            return
        upload.fail(abort.code, reason)

    def on_take(self, session: Peer, event: FileAccept) -> None:
        """A recipient that asks first took download `transfer`."""
        relay = self.of(session).downloads.get(event.transfer)
        if relay is not None:
            relay.want()

    def on_answer(self, session: Peer, event: FileSaved | FileRefuse) -> None:
        """A recipient saved (FileSaved) or gave up on (FileRefuse) a download."""
        relay = self.of(session).downloads.pop(event.transfer, None)
        if relay is None or not relay.answered():
            return
        user = self.rooms.user_of(session) or "?"
        upload = relay.upload
        if isinstance(event, FileSaved):
            upload.tell_sender(FileDelivered(upload.offer.transfer, user))
        else:
            upload.tell_sender(FileRefuse(upload.offer.transfer, event.code,
                                          f"{user}: {event.reason}", user))

    def on_got(self, session: Peer, got: FileGot) -> None:
        relay = self.of(session).downloads.get(got.transfer)
        if relay is not None:
            relay.confirm(got.offset)

    def on_resume(self, session: Peer, event: FileResume) -> None:
        """A recipient back after a drop: go on from what it has."""
        relay = self.of(session).downloads.get(event.transfer)
        if relay is None or not relay.resume(event.offset):
            self.deliver([(session, FileAbort(
                event.transfer, "cannot_resume", "the host no longer has the rest of "
                "this file; ask the sender to send it again"))])

    def held(self, session: Peer) -> tuple[tuple, tuple]:
        """For a Resumed: how far each of `session`'s uploads got, and the
        downloads still waiting for it (see Resumed)."""
        mine = self.peers.get(session, PeerFiles())
        uploads = tuple((number, upload.received, upload.state is UploadState.COMPLETE)
                        for number, upload in mine.uploads.items()
                        if upload.state is not UploadState.FAILED)
        downloads = tuple((number, relay.upload.sender_name, relay.upload.offer.name,
                           relay.upload.offer.size, relay.upload.offer.to)
                          for number, relay in mine.downloads.items()
                          if relay.state is not RelayState.FINISHED)
        return uploads, downloads

    # --- sessions going, uploads ending ---

    def forget(self, session: Peer, user: str) -> None:
        """`session` (`user`) left its room: its unfinished uploads fail
        (recipients are told the sender left; a complete upload goes on to
        its recipients), and the senders of files still coming to it are
        told it left."""
        mine = self.peers.pop(session, PeerFiles())
        for upload in mine.uploads.values():
            upload.sender = None
            upload.fail("sender_left", f"{user} left before the file was complete")
        for relay in mine.downloads.values():
            if relay.answered():
                relay.upload.tell_sender(FileRefuse(
                    relay.upload.offer.transfer, "recipient_left",
                    f"{user} left before saving the file", user))

    def forget_upload(self, upload: Upload) -> None:
        """The upload and its relays are done: drop it and its spool file."""
        self.uploads.discard(upload)
        sender = self.peers.get(upload.sender) if upload.sender is not None else None
        if sender is not None and sender.uploads.get(upload.offer.transfer) is upload:
            del sender.uploads[upload.offer.transfer]
        if upload.spool_path:
            try:
                os.unlink(upload.spool_path)
            except OSError as exc:          # the folder goes at close anyway
                log.warning("can't remove spool file %s: %s", upload.spool_path, exc)


# --- Call signalling ---------------------------------------------------------
# HostCalls arranges calls (the seed's "the server assigns the ports"): it
# runs CALLS' rules with the loop's clock, learns each client's media
# port, and when two people link it tells each the other's address, a fresh
# random key and the codecs they share. Media itself goes client to client
# over UDP; when UDP can't get through, it relays the sealed packets it
# cannot read over the clients' TCP connections, in a lane that drops the
# oldest packet rather than delay chat or grow.

@dataclasses.dataclass(eq=False)
class MediaLink:
    """One link as the host sees it: who, and the id media packets carry."""
    a: Peer
    b: Peer
    link_id: bytes

    def other(self, session: Peer) -> Peer | None:
        return self.b if session is self.a else self.a if session is self.b else None


class HostCalls:
    """The host's side of calls: invitations, links, keys, the media relay.

    The `on_*` methods take one call event from a session; `forget(session,
    reason)` ends everything of a session that leaves. Every outcome goes
    out through `deliver`, as the client vocabulary's events.
    """

    def __init__(self, limits: Limits, rooms: Rooms,
                 deliver: Callable[[list[Delivery]], None]) -> None:
        self.limits = limits
        self.rooms = rooms
        self.deliver = deliver
        self.calls = Calls(timeout_s=limits.call_timeout_s, max_size=limits.max_call_size)
        self.ports: dict[Peer, tuple[int, tuple[str, ...]]] = {}   # port, codecs
        self.links: dict[bytes, MediaLink] = {}         # by link id
        self.relayed = 0                    # media packets relayed
        self.refused = 0                    # media packets not on a link of their sender
        self._timer: asyncio.TimerHandle | None = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # --- events from a session ---

    def on_media_port(self, session: Peer, event: MediaPort) -> None:
        self.ports[session] = (event.port, tuple(event.codecs))

    def on_call(self, session: Peer, event: Call) -> None:
        self._act(session, lambda: self.calls.call(
            session, self.rooms.lookup(session, event.user), self._now()))

    def on_decline(self, session: Peer, event: Decline) -> None:
        self._act(session, lambda: self.calls.decline(
            session, self.rooms.lookup(session, event.user)))

    def on_hangup(self, session: Peer, event: Hangup) -> None:
        reason = event.reason if event.reason in ("hangup", "lost") else "hangup"
        self._act(session, lambda: self.calls.hangup(
            session, self.rooms.lookup(session, event.to) if event.to else None, reason))

    def on_relay(self, session: Peer, event: RelayMedia) -> None:
        """`session` gets no UDP from `event.user`: ask that one to relay."""
        try:
            peer = self.rooms.lookup(session, event.user)
        except Refused:
            return                          # they left meanwhile: nothing to relay
        if self.calls.linked(session, peer):
            self.deliver([(peer, RelayMedia(self._name(session)))])

    def on_media(self, session: Peer, event: MediaData) -> None:
        """A sealed media packet to pass on: routed by the link id inside
        (MEDIA PACKETS' header), only between the link's two ends."""
        link = self.links.get(bytes(event.data[2:6]))
        peer = link.other(session) if link is not None else None
        if peer is None:
            self.refused += 1
            return
        self.relayed += 1
        peer.link.offer_media(event)

    def forget(self, session: Peer, reason: str) -> None:
        """`session` left its room (`left`) or dropped off (`lost`)."""
        self.ports.pop(session, None)
        self._tell(self.calls.leave(session, reason))

    # --- inside ---

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _name(self, session: Peer) -> str:
        return self.rooms.user_of(session) or "?"

    def _act(self, session: Peer, request: Callable[[], list[CallNews]]) -> None:
        """Run a request; a refusal goes back to `session` as an error."""
        try:
            news = request()
        except Refused as refusal:
            self.deliver([(session, Error(refusal.code, refusal.message))])
            return
        self._tell(news)

    def _tell(self, news: list[CallNews]) -> None:
        """Turn CALLS' news into events for the people concerned."""
        out: list[Delivery] = []
        for item in news:
            if isinstance(item, Invited):
                out.append((item.callee, CallInvite(self._name(item.caller),
                                                    self.calls.timeout_s)))
            elif isinstance(item, Missed):
                out.append((item.callee, CallMissed(self._name(item.caller))))
                if item.reason in ("busy", "withdrawn"):   # else the caller is gone
                    reason = "busy" if item.reason == "busy" else "cancelled"
                    out.append((item.caller, CallFailed(self._name(item.callee), reason)))
            elif isinstance(item, Refusal):
                out.append((item.caller, CallFailed(self._name(item.callee), item.reason)))
            elif isinstance(item, TooMany):
                for one, other in ((item.a, item.b), (item.b, item.a)):
                    out.append((one, CallFailed(self._name(other), "call_full")))
            elif isinstance(item, Linked):
                out += self._start(item.a, item.b)
            elif isinstance(item, Unlinked):
                self._forget_link(item.a, item.b)
                out += [(item.a, CallEnded(self._name(item.b), item.reason)),
                        (item.b, CallEnded(self._name(item.a), item.reason))]
        self.deliver(out)
        self._schedule_expiry()

    def _start(self, a: Peer, b: Peer) -> list[Delivery]:
        """A new link: a fresh id and key, each side told where the other is."""
        link_id = secrets.token_bytes(4)
        while link_id in self.links:
            link_id = secrets.token_bytes(4)
        self.links[link_id] = MediaLink(a, b, link_id)
        key = secrets.token_hex(32)
        port_a, codecs_a = self.ports.get(a, (0, ()))
        port_b, codecs_b = self.ports.get(b, (0, ()))
        video = next((c for c in codecs_a if c in codecs_b and c in VIDEO_CODECS), "")
        audio = next((c for c in codecs_a if c in codecs_b and c in AUDIO_CODECS), "")
        out: list[Delivery] = []
        for me, peer, side, port in ((a, b, "a", port_b), (b, a, "b", port_a)):
            address = peer.link.transport.get_extra_info("peername") or ("0.0.0.0", 0)
            out.append((me, CallStart(self._name(peer), address[0], port, link_id.hex(),
                                      key, side, video, audio)))
        return out

    def _forget_link(self, a: Peer, b: Peer) -> None:
        for link_id, link in list(self.links.items()):
            if {link.a, link.b} == {a, b}:
                del self.links[link_id]

    def _schedule_expiry(self) -> None:
        """A timer for the next invitation to time out (none if none)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.calls.next_deadline()
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_at(
                deadline, lambda: self._tell(self.calls.expire(self._now())))


# =============================================================================
# 15. HOST: the listener, sessions, rooms, shutdown (asyncio)
# =============================================================================
# The room host: accepts connections, gives each a Session over a Link
# (CONNECTIONS), runs every room decision through Rooms (ROOMS), hands files
# and calls to its relays (HOST RELAYS), and advertises itself (DISCOVERY).
# Owns sockets and time; decides nothing that ROOMS or CALLS decides.
#
# Rules this section keeps (README.md, "Protocol and host rules"):
# - A broadcast never awaits a peer: it offers a frame to each member's
#   outbox and moves on. A peer whose outbox passes `outbox_limit_bytes`, or
#   which makes no progress on a non-empty outbox for `send_stall_s`, is too
#   slow and is disconnected; silently dropping its messages instead would
#   break "never loses a message", and waiting for it would slow its room.
# - Every wait on a peer has a deadline: the login (`hello_timeout_s`),
#   silence (`ping_interval_s`, then `peer_silence_s`), and the goodbye
#   flush (`close_timeout_s`, then the transport is aborted).
# - A broken stream gets one error frame with the reason and is closed; no
#   input reaches anything but that connection's own session.
# - Shutdown, in the order websockets uses: stop accepting, withdraw the
#   mDNS record and tell every session at once, wait for the handlers for
#   `close_timeout_s`, then abort whatever is still open.
# - No one address keeps the others out (README.md, "Limits"): it may hold
#   `max_per_address` connections, `max_pending_per_address` of them not
#   logged in yet, and all addresses together `max_pending` logins at once;
#   past a cap a connection hears why (too_many_connections, host_full) and
#   is closed before it costs a task. Out of file descriptors, the host
#   refuses with host_full through one descriptor it keeps in reserve, and
#   says so in its log once per episode, not per connection.
# - A member's chat lines pass its FloodGate (ROOMS) before the room sees
#   them: a burst gets rate_limited, a flood a disconnect ("flooding").

# --- Who may connect -----------------------------------------------------------

class Admission:
    """Who may connect now, by counts: connections open (from accept to
    the end of their handler) and those not logged in yet, in all and per
    source address. Bookkeeping only: the host asks `admit` as it accepts,
    then says `logged_in` and `release`."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.open = 0                       # connections, logged in or not
        self.pending = 0                    # ... of them not logged in yet
        self._open_from: collections.Counter[str] = collections.Counter()
        self._pending_from: collections.Counter[str] = collections.Counter()

    def admit(self, address: str) -> Error | None:
        """None, counting a new connection from `address` in (open, and
        pending until `logged_in`), or the Error to refuse it with."""
        limits = self.limits
        if self.open >= limits.max_sessions:
            return Error("host_full", "this host is full; try later")
        if limits.max_per_address and self._open_from[address] >= limits.max_per_address:
            return Error("too_many_connections", f"this host takes at most "
                         f"{limits.max_per_address} connections from one address")
        if limits.max_pending_per_address and \
                self._pending_from[address] >= limits.max_pending_per_address:
            return Error("too_many_connections", f"this host takes at most "
                         f"{limits.max_pending_per_address} logins at once from one "
                         "address; try again in a moment")
        if limits.max_pending and self.pending >= limits.max_pending:
            return Error("host_full", "this host has too many logins under way; "
                         "try again in a moment")
        self.open += 1
        self.pending += 1
        self._open_from[address] += 1
        self._pending_from[address] += 1
        return None

    def logged_in(self, address: str) -> None:
        """A connection from `address` finished its login (once per connection)."""
        self.pending -= 1
        _count_down(self._pending_from, address)

    def release(self, address: str, pending: bool) -> None:
        """A connection admitted from `address` ended (`pending`: before it logged in)."""
        self.open -= 1
        _count_down(self._open_from, address)
        if pending:
            self.logged_in(address)


def _count_down(counts: collections.Counter[str], key: str) -> None:
    """One less for `key`; none left, no key (addresses come and go)."""
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]


def _refuse(conn: socket.socket, error: Error) -> None:
    """Tell a connection we won't take it why, and close it: no Link, no
    task, so refusing a flood of connections costs little. Never raises."""
    with contextlib.suppress(OSError):
        conn.setblocking(False)
        # Bytes left unread would turn our close into a reset, which can
        # discard the error before the peer reads it.
        with contextlib.suppress(BlockingIOError, InterruptedError):
            conn.recv(65536)
        conn.send(encode(error))            # a few dozen bytes: an empty buffer takes them
        conn.shutdown(socket.SHUT_WR)
    conn.close()


def _reserve_descriptor() -> int | None:
    """A descriptor to give back when the process runs out (None: none left)."""
    try:
        return os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return None


class _Refusal(asyncio.Protocol):
    """A TLS connection we won't take: once the handshake is done, the
    error frame, then close (what the peer sends meanwhile is dropped)."""

    def __init__(self, error: Error) -> None:
        self.error = error

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        typing.cast(asyncio.Transport, transport).write(encode(self.error))
        transport.close()


async def _refuse_tls(conn: socket.socket, error: Error, context: ssl.SSLContext,
                      timeout_s: float) -> None:
    """`_refuse` for a host that speaks TLS: a refusal in plain text would
    not parse, so the handshake first (bounded by `timeout_s`, and the
    closing too). Never raises."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            await loop.connect_accepted_socket(
                lambda: _Refusal(error), conn, ssl=context, ssl_handshake_timeout=timeout_s,
                ssl_shutdown_timeout=timeout_s)
    except (OSError, ssl.SSLError, TimeoutError):
        conn.close()


# Out of descriptors: accept() fails with one of these while connections wait.
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})
# Refusals a TLS host does at once, each a handshake; past them it refuses
# by closing, without a word (a flood must stay cheap to refuse).
_TLS_REFUSALS_AT_ONCE = 64
_TLS_REFUSAL_TIMEOUT_S = 5.0
_ACCEPTS_PER_TURN = 64      # accepts before letting the loop's other tasks run

# --- Sessions and the host ---------------------------------------------------

_TICKS_PER_DEADLINE = 4     # the host looks at each deadline this often, at least


class Session:
    """The host's side of one client connection."""

    def __init__(self, host: Host, link: Link, address: str) -> None:
        self.host = host
        self.link = link
        self.address = address              # the peer's IP address: what limits count
        self.pending = True                 # not logged in yet (Admission counts it so)
        self.seat: Seat | None = None       # once logged in
        self.started = asyncio.get_running_loop().time()
        self.last_ping = self.started       # when we last pinged, or connected
        self.ping_count = 0
        extra = getattr(link.transport, "get_extra_info", None)
        peer = extra("peername") if extra is not None else None
        self.address = str(peer[0]) if peer else "?"   # where it connects from

    def __repr__(self) -> str:
        return f"<Session {self.link.name} {self.link.wire.state.value}>"

    async def run(self) -> None:
        link = self.link
        try:
            while not link.closing:
                try:
                    events = await link.receive()
                except RemoteError as exc:
                    if link.at_eof and self.seat is not None:   # a member cut off
                        link.close_with(None, "connection lost")    # inside a frame
                        break
                    log.info("%s broke the protocol: %s", link.name, exc.message)
                    link.close_with(Error(exc.code, exc.message), "bad frame")
                    break
                if events is None:
                    link.close_with(None, "connection lost")
                    break
                for event in events:
                    pause = self.host.dispatch(self, event)
                    if pause is not None:
                        await pause         # the host can't take more file yet
                    elif type(event) is not Chunk:
                        # Let the other peers' writers run between messages: one
                        # read can hold hundreds of them, and outboxes measured
                        # before any writer ran would call every reader slow.
                        await asyncio.sleep(0)
                    if link.closing:
                        break
        finally:
            self.host.forget(self)
            await link.finish()


class Seat:
    """A member's place at the host, which outlives one connection: rooms,
    files and calls know a member by its seat. When the connection drops,
    the seat is held for `grace_s` (`away_since` is set; what is sent to it
    meanwhile is dropped, the room's log keeps the room's events), and a
    client that says its `token` in a new hello sits down again: nobody is
    told it left, and it gets what it missed."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.token = secrets.token_hex(16)
        self.away_since: float | None = None    # loop time the connection dropped
        self.why = ""                           # why it dropped (the room is told so)
        limits = session.host.limits            # its chat lines, against floods:
        self.flood = FloodGate(limits.rate_limit_per_s, limits.burst, limits.flood_strikes) \
            if limits.rate_limit_per_s > 0 and limits.burst > 0 else None

    @property
    def link(self) -> Link:
        return self.session.link

    def __repr__(self) -> str:
        return f"<Seat {self.session.link.name}{' away' if self.away_since else ''}>"


# Why a connection ended -> hold the seat (the client may be back), or not.
_HOLD_FOR = frozenset({"connection lost", "too slow"})


class Host:
    """A room host: accepts connections, runs the rooms, advertises itself.

    `await start()` binds (then `port` is the real port) and, when
    advertising, registers on mDNS; `await close()` shuts down cleanly.
    With `tls` (its HostKey) every connection is TLS 1.3 and the key's
    fingerprint is advertised; without, plain TCP (--insecure).
    """

    def __init__(self, *, bind: str = "0.0.0.0", port: int = DEFAULT_PORT,
                 name: str | None = None, advertise: bool = True,
                 interface: str | None = None, limits: Limits = Limits(),
                 spool_dir: str | None = None, tls: HostKey | None = None) -> None:
        self.bind = bind
        self.port = port
        self.tls = tls
        self.fingerprint = tls.fingerprint if tls is not None else ""
        self.name = name or socket.gethostname()
        self.interface = interface
        self.limits = limits
        self.rooms = Rooms(host_name=self.name, history_limit=limits.history_limit,
                           grace_s=limits.grace_s, log_events=limits.resume_log_events,
                           log_bytes=limits.resume_log_bytes,
                           max_message_bytes=limits.max_message_bytes,
                           max_members=limits.max_room_members,
                           max_file_size=limits.max_file_size,
                           said_ids_kept=limits.said_ids_kept,
                           call_timeout_s=limits.call_timeout_s,
                           max_call_size=limits.max_call_size)
        self.files = HostFiles(limits, self.rooms, self.deliver, spool_dir)
        self.calls = HostCalls(limits, self.rooms, self.deliver)
        self.sessions: set[Session] = set()
        self.seats: dict[str, Seat] = {}    # by resume token
        self.admission = Admission(limits)
        self.guesses = Guesses(limits.password_delay_s, limits.password_delay_max_s)
        self._hashing: set[str] = set()     # addresses with a password being hashed
        self._hasher = concurrent.futures.ThreadPoolExecutor(
            limits.password_threads, thread_name_prefix="host-scrypt")     # started when used
        self.advertiser = Advertiser(self.name, port, interface, limits.advertise_debounce_s,
                                     self.fingerprint) if advertise else None
        self._tls: ssl.SSLContext | None = None     # the server's, once started (None: --insecure)
        self._refusals: set[asyncio.Task] = set()   # TLS refusals under way (handshakes)
        self._serving = False               # listening, until close() begins
        self._listeners: list[socket.socket] = []
        self._acceptors: list[asyncio.Task] = []
        self._spare: int | None = None      # a descriptor held back for refusing
        self._handlers: set[asyncio.Task] = set()
        self._ticker: asyncio.Task | None = None
        self._closed = asyncio.Event()
        self._started = False               # start() was called (close() then cleans up)
        # What each event from a client does: the Wire has already checked
        # that the event may come in the session's state.
        self._dispatch: dict[type[Event], Callable[[Seat, Any], Any]] = {
            Say: self._on_say, Who: self._on_who, Bye: self._on_bye, Ping: self._on_ping,
            FileOffer: self.files.on_offer, Chunk: self.files.on_chunk,
            FileEnd: self.files.on_end, FileAbort: self.files.on_abort,
            FileSaved: self.files.on_answer, FileRefuse: self.files.on_answer,
            FileGot: self.files.on_got, FileResume: self.files.on_resume,
            FileAccept: self.files.on_take,
            MediaPort: self.calls.on_media_port, Call: self.calls.on_call,
            Decline: self.calls.on_decline, Hangup: self.calls.on_hangup,
            RelayMedia: self.calls.on_relay, MediaData: self.calls.on_media,
        }

    async def start(self) -> None:
        """Bind and advertise. On failure (a taken port, say) everything
        started is undone before the error propagates; `close()` is then a
        no-op."""
        self._started = True
        loop = asyncio.get_running_loop()
        before, after = raise_open_files_limit()
        if after != before:
            log.info("open files limit raised from %d to %d", before, after)
        self.files.start()
        try:
            self._tls = self.tls.server_context() if self.tls is not None else None
            self._listeners = await self._listen()
            self.port = self._listeners[0].getsockname()[1]
            self._spare = _reserve_descriptor()
            self._serving = True
            self._acceptors = [loop.create_task(self._serve(listener), name=f"host:accept:{n}")
                               for n, listener in enumerate(self._listeners)]
            for acceptor in self._acceptors:
                log_failure(acceptor, "accepting connections")
            self._ticker = loop.create_task(self._tick(), name="host:tick")
            log_failure(self._ticker, "the host's housekeeping")
            if self.advertiser is not None:
                self.advertiser.port = self.port
                await self.advertiser.start()
        except BaseException:
            await self._abandon()
            raise
        log.info("host %r listening on %s:%d (%s)", self.name, self.bind, self.port,
                 f"TLS, key {show_fingerprint(self.fingerprint)}" if self.tls else
                 "plain TCP: --insecure")

    async def _abandon(self) -> None:
        """Undo a start that failed half way."""
        await self._stop_listening()
        if self._ticker is not None:
            self._ticker.cancel()
        if self.advertiser is not None:
            await self.advertiser.close()
        self.files.abandon()
        self._hasher.shutdown(wait=False, cancel_futures=True)
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def close(self, reason: str = "host_shutdown") -> None:
        """Stop accepting, withdraw mDNS, say goodbye to everyone, and wait
        at most `close_timeout_s` before aborting what is left. Idempotent,
        and harmless on a host that never started (or failed to)."""
        if not self._serving:
            if not self._started and not self._closed.is_set():  # never started
                if self.advertiser is not None:
                    await self.advertiser.close()
                self._closed.set()
            await self._closed.wait()
            return
        await self._stop_listening()
        if self._ticker is not None:
            self._ticker.cancel()
        for session in list(self.sessions):
            if session.link.wire.state is State.AWAITING_HELLO:
                session.link.abort(reason)
            else:
                session.link.close_with(Closing(reason), reason)
        withdraw = self.advertiser.close() if self.advertiser else asyncio.sleep(0)
        handlers = list(self._handlers)
        await asyncio.gather(withdraw, return_exceptions=True)
        if handlers:
            _, pending = await asyncio.wait(handlers, timeout=self.limits.close_timeout_s)
            if pending:
                for session in list(self.sessions):
                    session.link.abort(reason)
                await asyncio.wait(pending)
        self.calls.close()
        await self.files.close()            # handlers are gone; finish their tasks
        self._hasher.shutdown(wait=False, cancel_futures=True)
        self._closed.set()
        log.info("host %r closed", self.name)

    # --- connections ---

    async def _listen(self) -> list[socket.socket]:
        """Listening sockets for `bind` and `port`, one per address the name
        resolves to, all on the port the first one got. Raises OSError."""
        infos = await asyncio.get_running_loop().getaddrinfo(
            self.bind or None, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        listeners: list[socket.socket] = []
        port = self.port
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                listeners.append(sock)
                if os.name == "posix":      # a restarted host gets its port back at once
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:   # "::" is IPv6 only, as asyncio has it
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address[0], port, *address[2:]))
                # asyncio's default backlog of 100 let the kernel drop 560 of
                # 1,500 connections arriving at once (the kernel caps it, too).
                sock.listen(self.limits.listen_backlog)
                sock.setblocking(False)
                port = sock.getsockname()[1]
        except BaseException:
            for sock in listeners:
                sock.close()
            raise
        return listeners

    async def _stop_listening(self) -> None:
        """Stop accepting: the acceptors end, the listening sockets close."""
        self._serving = False
        acceptors, self._acceptors = self._acceptors, []
        for acceptor in acceptors:
            acceptor.cancel()
        if acceptors:
            await asyncio.wait(acceptors)
        for listener in self._listeners:
            listener.close()
        self._listeners = []
        for refusal in list(self._refusals):
            refusal.cancel()
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None

    async def _serve(self, listener: socket.socket) -> None:
        """Accept connections on `listener` until cancelled: each one is
        admitted (a handler task) or refused at once. When the process runs
        out of descriptors, the waiting connections are refused (host_full)
        through the one held in reserve, or, with none, the next try comes
        `accept_pause_s` later; the log says so once, not per connection
        (asyncio's own accept loop wrote 43 MB of tracebacks in 30 s)."""
        loop = asyncio.get_running_loop()
        starved = False                     # in an episode of running out
        turn = 0
        while True:
            turn += 1
            if turn % _ACCEPTS_PER_TURN == 0:
                await asyncio.sleep(0)
            try:
                conn, peer = await loop.sock_accept(listener)
            except ConnectionAbortedError:  # it went before we took it
                continue
            except OSError as exc:
                if not starved:
                    starved = True
                    log.warning("can't accept connections (%s): refusing new ones until "
                                "some close", _why(exc))
                if exc.errno in _OUT_OF_DESCRIPTORS and self._refuse_with_spare(listener):
                    continue
                await asyncio.sleep(self.limits.accept_pause_s)
                continue
            if starved:
                starved = False
                log.warning("accepting connections again")
            try:
                self._admit(conn, peer)
            except Exception:               # a bug: lose this connection, not the listener
                log.exception("accepting a connection failed")
                conn.close()

    def _admit(self, conn: socket.socket, peer: Any) -> None:
        """A connection just accepted: a handler task for it, or a refusal."""
        address = peer[0] if isinstance(peer, tuple) else str(peer)
        refusal = self.admission.admit(address)
        if refusal is not None:
            log.debug("refused %s: %s", address, refusal.code)
            self._refuse(conn, refusal)
            return
        name = address_text(address, peer[1]) if isinstance(peer, tuple) else address
        task = asyncio.get_running_loop().create_task(self._handle(conn, address, name),
                                                      name=f"session:{name}")
        self._handlers.add(task)

    def _refuse_with_spare(self, listener: socket.socket) -> bool:
        """Out of descriptors: free the reserved one, take the oldest waiting
        connection with it, refuse it (host_full) and reserve one again.
        False when no connection was waiting or there was no reserve."""
        if self._spare is None:
            self._spare = _reserve_descriptor()     # something freed one since?
            if self._spare is None:
                return False
        os.close(self._spare)
        self._spare = None
        try:
            conn, _ = listener.accept()
        except OSError:                     # none waiting (or another thread was quicker)
            conn = None
        if conn is not None:
            self._refuse(conn, Error("host_full", "this host can't take more connections "
                                     "now; try later"))
        self._spare = _reserve_descriptor()
        return conn is not None

    def _refuse(self, conn: socket.socket, error: Error) -> None:
        """Refuse `conn` with `error`: in plain TCP at once (`_refuse`); in
        TLS after the handshake, on a task of its own (`_refuse_tls`), or,
        with `_TLS_REFUSALS_AT_ONCE` of those under way, by closing."""
        if self._tls is None:
            _refuse(conn, error)
            return
        if len(self._refusals) >= _TLS_REFUSALS_AT_ONCE:
            conn.close()
            return
        task = asyncio.get_running_loop().create_task(
            _refuse_tls(conn, error, self._tls, min(_TLS_REFUSAL_TIMEOUT_S,
                                                    self.limits.hello_timeout_s)),
            name="host:refuse")
        self._refusals.add(task)
        task.add_done_callback(self._refusals.discard)

    async def _handle(self, conn: socket.socket, address: str, name: str) -> None:
        """One admitted connection, from accept to the last byte (TLS: the
        handshake first, within `hello_timeout_s`). Never raises."""
        task = asyncio.current_task()
        session: Session | None = None
        try:
            try:
                transport, protocol = \
                    await asyncio.get_running_loop().connect_accepted_socket(
                        LinkProtocol, sock=conn, ssl=self._tls,
                        ssl_handshake_timeout=self.limits.hello_timeout_s
                        if self._tls is not None else None)
            except (OSError, ssl.SSLError, TimeoutError) as exc:    # not TLS, or gone
                log.debug("%s: no TLS handshake: %s", name, _why(exc))
                conn.close()
                return
            link = Link(Wire(Role.HOST, self.limits.max_frame_bytes), transport,
                        self.limits, name)
            protocol.attach(link)
            session = Session(self, link, address)
            if not self._serving:
                link.abort("host_shutdown")
            self.sessions.add(session)
            await session.run()
        except Exception:
            log.exception("session %s failed", name)
            if session is not None:
                session.link.abort("internal error")
            else:
                conn.close()
        finally:
            if session is not None:
                self.sessions.discard(session)
            self.admission.release(address, session is None or session.pending)
            self._handlers.discard(task)

    def _logged_in(self, session: Session) -> None:
        """`session` has a seat now: it no longer counts as a login under way."""
        if session.pending:
            session.pending = False
            self.admission.logged_in(session.address)

    def forget(self, session: Session) -> None:
        """A session ended (idempotent; the handler's last act). A seat lost
        with its connection is held for `grace_s` (its files wait for it);
        one left on purpose, or after a resume moved it elsewhere, is not
        held."""
        seat = session.seat
        if seat is None or seat.session is not session or seat.away_since is not None:
            return                          # never seated, sitting elsewhere, or held
        user = self.rooms.user_of(seat)
        if user is None:
            return
        if session.link.close_reason in _HOLD_FOR and self.limits.grace_s > 0 \
                and self._serving:
            seat.away_since = asyncio.get_running_loop().time()
            seat.why = session.link.close_reason
            log.info("%s (%r) dropped; holding the seat for %g s", session.link.name, user,
                     self.limits.grace_s)
            return
        self._unseat(seat, session.link.close_reason)

    def _unseat(self, seat: Seat, why: str) -> None:
        """Take a seat out of its room for good: files, calls, the room told."""
        user = self.rooms.user_of(seat)
        log.info("%s (%r) leaves: %s", seat.link.name, user, why or "asked to")
        self.seats.pop(seat.token, None)
        if user is None:
            return
        self.files.forget(seat, user)
        shown = "" if why in ("bye", "host_shutdown") else why
        self.calls.forget(seat, "left" if why in ("bye", "host_shutdown") else "lost")
        self.deliver(self.rooms.leave(seat, unix_now(), shown))
        self._rooms_changed()

    def _rooms_changed(self) -> None:
        if self.advertiser is not None:
            self.advertiser.rooms_changed(self.rooms.summary())

    # --- dispatch ---

    def dispatch(self, session: Session, event: Event) -> Any:
        """Act on one event from a session's peer (the Wire has checked that
        it is allowed now: anything but a hello comes once it is seated).
        Returns an awaitable when the session must stop reading until it
        completes (its file is arriving faster than the disk takes it),
        else None."""
        if type(event) is Hello:
            return self._on_hello(session, event)
        handler = self._dispatch.get(type(event))
        seat = session.seat
        if handler is None or seat is None or seat.session is not session:
            return None                     # a connection a resume replaced: ignore it
        return handler(seat, event)

    def _on_hello(self, session: Session, hello: Hello) -> Awaitable[None] | None:
        """A login: a resume, a plain join, or (a password given, or the room
        protected) a join whose password is hashed on a thread first: then
        the awaitable the session waits for before reading on."""
        link = session.link
        if hello.version != PROTOCOL_VERSION:
            link.close_with(Error("version_mismatch", f"this host speaks protocol "
                                  f"version {PROTOCOL_VERSION}; you sent {hello.version}"),
                            "version mismatch")
            return None
        if hello.resume and self._resume(session, hello):
            return None                     # a valid token: no password again
        try:
            lock = self.rooms.door(hello.room, bool(hello.password))
        except Refused as refusal:          # no password, or one an open room refuses
            link.close_with(Error(refusal.code, refusal.message), refusal.code)
            return None
        if not hello.password:
            self._sit(session, hello, None)
            return None
        return self._unlock(session, hello, lock)

    async def _unlock(self, session: Session, hello: Hello, lock: Lock | None) -> None:
        """Hash the hello's password on a thread (with `lock`'s salt, or a new
        one for a room this login opens), then sit down. An address waiting
        out a wrong guess, or with a hash already running, is refused with
        rate_limited before anything is hashed; the plaintext is dropped
        with the hello."""
        link = session.link
        loop = asyncio.get_running_loop()
        who = guesser(session.address)
        wait = self.guesses.wait(who, loop.time()) if lock is not None else 0.0
        if wait > 0 or who in self._hashing:
            wait = wait or self.limits.password_delay_s
            link.close_with(Error("rate_limited", "too many wrong passwords from your "
                                  f"address; try again in {math.ceil(wait)} s",
                                  retry_after=round(wait, 3)), "rate_limited")
            return
        self._hashing.add(who)
        try:
            for _attempt in range(3):   # the room changed its lock while we hashed: again
                salt = lock.salt if lock is not None else secrets.token_bytes(SALT_BYTES)
                key = await loop.run_in_executor(self._hasher, password_key,
                                                 hello.password, salt)
                if link.closing or not self._serving:
                    return
                try:
                    now_lock = self.rooms.door(hello.room, True)
                except Refused as refusal:  # it closed and an open one took its name
                    link.close_with(Error(refusal.code, refusal.message), refusal.code)
                    return
                if now_lock is lock:
                    break
                lock = now_lock
        finally:
            self._hashing.discard(who)
        self._sit(session, hello, Lock(salt, key))

    def _sit(self, session: Session, hello: Hello, lock: Lock | None) -> None:
        """Seat a fresh login in its room, or refuse it (a wrong password
        then makes its address wait: the wait is the error's retry_after)."""
        link = session.link
        seat = Seat(session)                # a fresh login (or a token we forgot)
        try:
            deliveries = self.rooms.join(seat, hello.room, hello.user, unix_now(),
                                         seat.token if self.limits.grace_s > 0 else "",
                                         lock)
        except Refused as refusal:
            error = Error(refusal.code, refusal.message)
            if refusal.code == "wrong_password" and lock is not None:
                wait = self.guesses.wrong(guesser(session.address),
                                          asyncio.get_running_loop().time())
                log.info("%s: wrong password for %r", link.name, hello.room)
                error = Error(refusal.code, f"{refusal.message}; the next try from your "
                              f"address is heard in {math.ceil(wait)} s",
                              retry_after=round(wait, 3))
            link.close_with(error, refusal.code)
            return
        session.seat = seat
        self.files.of(seat).asks = hello.ask
        self._logged_in(session)
        self.seats[seat.token] = seat
        log.info("%s joined %r as %r%s", link.name, hello.room, hello.user,
                 " (a password)" if lock is not None else "")
        self.deliver([(to, self._paced(event) if type(event) is Welcome else event)
                      for to, event in deliveries])
        self._rooms_changed()

    def _paced(self, event: Welcome | Resumed, **fields: Any) -> Any:
        """A login's answer, saying our flood limits (the client keeps under them)."""
        limits = self.limits
        if limits.rate_limit_per_s > 0 and limits.burst > 0:
            fields.update(rate=limits.rate_limit_per_s, burst=limits.burst)
        return dataclasses.replace(event, **fields)

    def _resume(self, session: Session, hello: Hello) -> bool:
        """Sit `session` down in the seat its token names, if that seat is
        this user's in this room; False if the host has no such seat."""
        seat = self.seats.get(hello.resume)
        room = self.rooms.room_of(seat) if seat is not None else None
        if seat is None or room is None or id_key(room.name) != id_key(hello.room) \
                or id_key(self.rooms.user_of(seat) or "") != id_key(hello.user):
            return False
        old = seat.session
        if old is not session and not old.link.closing:
            old.link.abort("replaced")      # the client knows it's dead before we do
        seat.session, seat.away_since = session, None
        session.seat = seat
        self.files.of(seat).asks = hello.ask
        self._logged_in(session)
        log.info("%s resumed %r in %r", session.link.name, hello.user, room.name)
        uploads, downloads = self.files.held(seat)
        self.deliver([(to, self._paced(event, uploads=uploads, downloads=downloads)
                       if type(event) is Resumed else event)
                      for to, event in self.rooms.resume(seat, hello.seen)])
        return True

    def _on_say(self, seat: Seat, say: Say) -> None:
        gate = seat.flood
        verdict = gate.take(asyncio.get_running_loop().time()) if gate else Verdict.PASS
        if verdict is Verdict.PASS:
            self.deliver(self.rooms.say(seat, say.text, say.id, unix_now(), say.to))
        elif verdict is Verdict.REFUSE and gate:    # the line, not the person: nothing
            self.deliver([(seat, Error(                 # is stamped, logged or relayed
                "rate_limited", f"too many messages: at most {gate.burst} at once, then "
                f"{gate.rate_per_s:g} a second; this one was not sent", say.id))])
        else:
            log.warning("%s (%r) floods its room; disconnecting it", seat.link.name,
                        self.rooms.user_of(seat))
            seat.link.close_reason = "flooding"
            self.forget(seat.session)       # the room is told: "left the room (flooding)"
            seat.link.close_with(Closing("flooding"), "flooding")

    def _on_who(self, seat: Seat, who: Who) -> None:
        self.deliver(self.rooms.who(seat))

    def _on_bye(self, seat: Seat, bye: Bye) -> None:
        seat.link.close_reason = "bye"
        self.forget(seat.session)
        seat.link.close_with(Closing("bye"), "bye")

    def _on_ping(self, seat: Seat, ping: Ping) -> None:
        self.deliver([(seat, Pong(ping.n))])

    def deliver(self, deliveries: list[Delivery]) -> None:
        """Offer each event to its recipient's outbox; never waits.

        A frame is encoded once per event however many receive it. A
        recipient that can't take it is disconnected as too slow, after the
        loop, so its leave notice is delivered like any other.
        """
        frames: dict[int, bytes] = {}
        too_slow: list[Seat] = []
        for seat, event in deliveries:     # a held seat's closed link takes nothing
            frame = frames.get(id(event))
            if frame is None:
                frame = frames[id(event)] = encode(event)
            if not seat.link.offer(event, frame) and seat.link.accepting:
                too_slow.append(seat)
        for seat in too_slow:
            log.warning("%s is too slow; disconnecting it", seat.link.name)
            seat.link.abort("too slow")
            self.forget(seat.session)

    # --- housekeeping ---

    async def _tick(self) -> None:
        """Once per `tick_s`: login deadlines, pings, silence, stalled peers."""
        loop = asyncio.get_running_loop()
        limits = self.limits
        # Short limits (tests) need a finer tick, or a peer that answers every
        # ping could be found silent between a tick and the next.
        period = min(limits.tick_s, *(deadline / _TICKS_PER_DEADLINE for deadline in (
            limits.ping_interval_s, limits.peer_silence_s, limits.hello_timeout_s,
            limits.grace_s or limits.tick_s)))
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            for seat in [seat for seat in self.seats.values() if seat.away_since is not None
                         and now - seat.away_since > limits.grace_s]:
                log.info("%s did not come back within %g s", seat.link.name, limits.grace_s)
                self._unseat(seat, seat.why)
            for session in list(self.sessions):
                link = session.link
                if link.closing:
                    continue
                if link.wire.state is State.AWAITING_HELLO or \
                        link.wire.state is State.AWAITING_WELCOME:
                    if now - session.started > limits.hello_timeout_s:
                        link.close_with(Error("login_timeout", "the login took too long"),
                                        "login timeout")
                elif now - link.last_heard > limits.peer_silence_s:
                    link.abort("connection lost")
                    self.forget(session)
                elif (link.queued_bytes or link.bulk_bytes) and \
                        now - link.last_progress > limits.send_stall_s:
                    link.abort("too slow")
                    self.forget(session)
                elif session.seat is not None and min(now - link.last_heard,
                                                      now - session.last_ping) > \
                        limits.ping_interval_s:
                    session.last_ping = now
                    session.ping_count += 1
                    self.deliver([(session.seat, Ping(session.ping_count))])


# =============================================================================
# 16. CLIENT FILES: files we send and receive, beside the client core
# =============================================================================
# ClientFiles does for one client what HostFiles does for the host: it
# offers our files, streams them from disk in chunks that chat overtakes,
# and writes what arrives to a hidden .part file that gets its final name
# only once its size and SHA-256 match. ClientCore (CLIENT CORE) owns it and feeds
# it; it never opens a connection or reads a line a person typed.
#
# Rules it keeps (README.md, "Files"): "A file is written under a hidden
# name and gets its final name only once its size and SHA-256 match";
# "an existing file is never overwritten"; "names are untrusted" (3.
# safe_filename); every disk read and write runs on a thread, never on the
# loop; a disk that falls behind pauses reading from the host instead of
# buffering without bound.

def default_downloads_dir() -> Path:
    """A `chatroom` folder in the person's usual downloads folder.

    Linux: XDG_DOWNLOAD_DIR from ~/.config/user-dirs.dirs when set there;
    everywhere else (and as the fallback) ~/Downloads.
    """
    home = Path.home()
    base = home / "Downloads"
    config = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config") / "user-dirs.dirs"
    try:
        for line in config.read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "XDG_DOWNLOAD_DIR":
                value = value.strip().strip('"').replace("$HOME", str(home))
                if value and Path(value).is_absolute() and Path(value) != home:
                    base = Path(value)
    except (OSError, UnicodeDecodeError):
        pass
    return base / "chatroom"


_PART_RE = re.compile(r"\..*\.chatroom-(\d+)-[0-9a-f]+\.part\Z")


def claim_name(part: Path, folder: Path, name: str) -> Path:
    """Give the verified file `part` its final name in `folder`, never
    overwriting: "name.ext", else "name (1).ext", ... Returns the path."""
    for candidate in numbered_names(name):
        target = folder / candidate
        try:
            os.link(part, target)           # atomic, and fails if target exists
        except FileExistsError:
            continue
        except OSError:                     # no hard links here (FAT, ...)
            if os.path.lexists(target):
                continue
            os.rename(part, target)         # Windows: refuses to overwrite too
            return target
        os.unlink(part)
        return target
    raise OSError(errno.EEXIST, "no free name")   # pragma: no cover (endless supply)


def remove_stale_parts(folder: Path, keep: frozenset[str] = frozenset()) -> None:
    """Delete .part files left by chatroom processes that no longer run,
    but those named in `keep` (downloads we are about to resume)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        match = _PART_RE.match(entry.name)
        if match and entry.name not in keep and not _process_alive(int(match.group(1))):
            try:
                os.unlink(entry.path)
            except OSError:
                pass


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":                     # pragma: no cover (no cheap check)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class Progress:
    """Paces file_progress events: at most one per `interval_s`."""

    def __init__(self, size: int, interval_s: float = PROGRESS_INTERVAL_S) -> None:
        self.size = size
        self.interval_s = interval_s
        self.started = time.monotonic()
        self._last = 0.0
        self._last_done = -1

    def event(self, base: dict, done: int, force: bool = False) -> dict | None:
        """A file_progress event for `done` bytes, or None if one was sent
        less than `interval_s` ago (`force`: unless it said the same)."""
        now = time.monotonic()
        if done == self._last_done or (not force and now - self._last < self.interval_s):
            return None
        self._last, self._last_done = now, done
        elapsed = max(now - self.started, 1e-6)
        rate = done / elapsed
        left = (self.size - done) / rate if rate > 0 else None
        return dict({"type": "file_progress"}, **base, bytes=done, size=self.size,
                    percent=round(100.0 * done / self.size, 1) if self.size else 100.0,
                    rate=round(rate), eta=round(left, 1) if left is not None else None)


class SendState(enum.Enum):
    OFFERED = "offered"             # file_offer sent; waiting for file_accept
    SENDING = "sending"             # the data is going out
    ENDED = "ended"                 # every byte and file_end queued
    STORED = "stored"               # the host has every byte (file_sent said so)
    FAILED = "failed"               # refused, failed or cancelled (file_failed said so)


class ReceiveState(enum.Enum):
    WAITING = "waiting"             # asked: nothing comes until the person answers
    RECEIVING = "receiving"         # data is arriving, written to the .part file
    VERIFYING = "verifying"         # all arrived; hashing and naming it
    SAVED = "saved"                 # under its final name (file_received said so)
    FAILED = "failed"               # given up; the .part file is deleted


# (state, what happened) -> the next state. A pair not listed does not move:
# late or repeated news (a refusal after the end), or a host that broke the
# order of things, which is ignored rather than believed.
SEND_MOVES: dict[tuple[SendState, str], SendState] = {
    (SendState.OFFERED, "accepted"): SendState.SENDING,
    (SendState.SENDING, "resumed"): SendState.SENDING,      # back after a drop:
    (SendState.ENDED, "resumed"): SendState.SENDING,        # the rest, from where
    (SendState.OFFERED, "resumed"): SendState.SENDING,      # the host got to
    (SendState.SENDING, "ended"): SendState.ENDED,
    (SendState.ENDED, "stored"): SendState.STORED,
    (SendState.OFFERED, "failed"): SendState.FAILED,
    (SendState.SENDING, "failed"): SendState.FAILED,
    (SendState.ENDED, "failed"): SendState.FAILED,
    # /cancel: also once the host has it all, while recipients still fetch it
    (SendState.OFFERED, "cancelled"): SendState.FAILED,
    (SendState.SENDING, "cancelled"): SendState.FAILED,
    (SendState.ENDED, "cancelled"): SendState.FAILED,
    (SendState.STORED, "cancelled"): SendState.FAILED,
}
RECEIVE_MOVES: dict[tuple[ReceiveState, str], ReceiveState] = {
    (ReceiveState.WAITING, "accepted"): ReceiveState.RECEIVING,
    (ReceiveState.WAITING, "failed"): ReceiveState.FAILED,
    (ReceiveState.RECEIVING, "ended"): ReceiveState.VERIFYING,
    (ReceiveState.VERIFYING, "saved"): ReceiveState.SAVED,
    (ReceiveState.RECEIVING, "failed"): ReceiveState.FAILED,
    (ReceiveState.VERIFYING, "failed"): ReceiveState.FAILED,
}


@dataclasses.dataclass(eq=False)
class OutgoingFile:
    """A file we send (client side)."""
    transfer: int
    path: Path
    name: str
    size: int
    to: str
    accepted: asyncio.Future                # -> True (send it) or False (refused)
    settled: asyncio.Future                 # done once STORED or FAILED
    progress: Progress
    state: SendState = SendState.OFFERED
    sent: int = 0
    sha256: str = ""
    generation: int = 0                     # counts resumes: an older stream stops
    recipient_answered: bool = False        # one-to-one: its recipient saved or refused it;
                                            # nothing is left to /cancel (the host may still
                                            # be STORING it: a separate fact from `state`)

    def move(self, what: str) -> bool:
        """Take the lifecycle step `what`; False if it doesn't apply now."""
        state = SEND_MOVES.get((self.state, what))
        if state is None:
            return False
        self.state = state
        if state in (SendState.STORED, SendState.FAILED):
            if not self.accepted.done():
                self.accepted.set_result(False)
            if not self.settled.done():
                self.settled.set_result(None)
        return True

    def base(self) -> dict:
        return {"transfer": self.transfer, "name": self.name, "direction": "send",
                "to": self.to or None}


@dataclasses.dataclass(eq=False)
class IncomingFile:
    """A file coming to us (client side), written to a hidden .part file."""
    transfer: int
    sender: str
    name: str                               # as the sender called it
    safe_name: str                          # what we will call it
    size: int
    to: str
    part: Path
    progress: Progress
    state: ReceiveState = ReceiveState.RECEIVING
    received: int = 0
    written: int = 0                        # of which on our disk (FileGot says it)
    file: Any = None                        # open only inside the write thread
    hasher: Any = dataclasses.field(default_factory=hashlib.sha256)
    batch: list = dataclasses.field(default_factory=list)
    batch_bytes: int = 0
    writes: collections.deque = dataclasses.field(default_factory=collections.deque)
    stale: bool = False                     # WAITING across a drop: accept with FileResume

    def move(self, what: str) -> bool:
        """Take the lifecycle step `what`; False if it doesn't apply now."""
        state = RECEIVE_MOVES.get((self.state, what))
        if state is None:
            return False
        self.state = state
        return True

    @property
    def failed(self) -> bool:               # read by the write thread too
        return self.state is ReceiveState.FAILED

    def base(self) -> dict:
        return {"transfer": self.transfer, "name": self.safe_name, "direction": "receive",
                "from": self.sender}


class ClientFiles:
    """Every file this client sends or receives, beside ClientCore.

    Lives on the core's loop. The core hands it the connection once the
    login is accepted (`attach`), every file event from the host
    (`handlers`), and the end of the connection (`connection_ended`); it
    talks to the host through that Link and to the front end through
    `emit`. Disk work runs on two threads of its own: one reads the files
    we send, one writes the files we get, so each keeps its order and
    neither blocks the loop or the other.

    A dropped connection pauses files (`connection_lost`); back in the same
    seat, `resumed` carries each on from where the host or we got to; only
    `give_up` (the session is over, or the host forgot us) fails them.
    """

    def __init__(self, limits: Limits, downloads: Path,
                 emit: Callable[[dict | None], None]) -> None:
        self.limits = limits
        self.downloads = downloads
        self.emit = emit
        self.link: Link | None = None       # while logged in
        self.host_max_file = 0              # the host's --max-file-size, from ready
        self.user = ""                      # our User ID, from ready (a cancel's `by`)
        # Files larger than this wait for /accept or /decline (--ask-above,
        # the window's setting); None: never ask, and the hello says so.
        self.ask_above: int | None = None
        self.uploads: dict[int, OutgoingFile] = {}
        self.downloads_by_number: dict[int, IncomingFile] = {}
        self._saved: dict[int, None] = {}   # downloads saved lately (a resume may ask)
        self.orphans: dict[int, dict] = {}  # downloads a run of ours before a crash began
        self._sending: set[asyncio.Task] = set()    # send() calls not yet queued
        self._next_transfer = 0
        self._downloads_checked = False     # stale .part files removed once
        self._read_io = concurrent.futures.ThreadPoolExecutor(1, "file-read")
        self._write_io = concurrent.futures.ThreadPoolExecutor(1, "file-write")
        self.handlers: dict[type[Event], Callable[[Any], Any]] = {
            FileAccept: self._on_accept, FileRefuse: self._on_refuse,
            FileStored: self._on_stored, FileDelivered: self._on_delivered,
            FileAnnounce: self._on_announce, Chunk: self._on_chunk, FileEnd: self._on_end,
            FileAbort: self._on_abort,
        }

    # --- the connection ---

    @property
    def busy(self) -> bool:
        """Is a file still on its way, either way? (Any thread: a glance.)
        One that waits for our answer is not: leaving answers it."""
        return any(dl.state is not ReceiveState.WAITING
                   for dl in list(self.downloads_by_number.values())) or any(
            up.state in (SendState.OFFERED, SendState.SENDING, SendState.ENDED)
            for up in list(self.uploads.values()))

    def attach(self, link: Link, host_max_file: int, user: str = "") -> None:
        """Logged in on `link` as `user`; the host takes files of at most
        `host_max_file`."""
        self.link = link
        self.host_max_file = host_max_file
        self.user = user or self.user

    def connection_lost(self) -> None:
        """The connection is gone: files wait (what arrived is written)
        until `resumed` or `give_up`."""
        self.link = None
        for dl in self.downloads_by_number.values():
            self._flush_batch(dl)

    def give_up(self, reason: str = "the connection to the host ended") -> None:
        """The session is over (or the host forgot us): whatever is still
        moving has failed."""
        for dl in list(self.downloads_by_number.values()):
            self._fail_download(dl, "cancelled", reason, tell_host=False)
        for up in self.uploads.values():
            if up.move("failed"):
                self._file_failed(up.base(), "cancelled", reason)
        self.uploads.clear()
        self._saved.clear()

    def resumed(self, event: Resumed) -> None:
        """Back in the same seat (after `attach`): each file goes on from
        where it got to; one the host no longer has has failed."""
        link = self.link
        assert link is not None
        gone = "the host no longer has this file (it was restarted, or gave up on it)"
        uploads = {number: (have, complete) for number, have, complete in event.uploads}
        for up in list(self.uploads.values()):
            if up.state not in (SendState.OFFERED, SendState.SENDING, SendState.ENDED):
                continue
            if up.transfer not in uploads:
                if up.state is SendState.OFFERED:   # the offer may never have arrived
                    link.offer(FileOffer(up.transfer, up.name, up.size, up.to))
                elif up.move("failed"):
                    self._file_failed(up.base(), "cancelled", gone)
                continue
            have, complete = uploads[up.transfer]
            if complete and up.state is SendState.ENDED:
                self._on_stored(FileStored(up.transfer))
            elif up.move("resumed"):
                if not up.accepted.done():
                    up.accepted.set_result(True)
                task = asyncio.get_running_loop().create_task(
                    self._resume_upload(link, up, have), name=f"resume:{up.name}")
                log_failure(task, f"sending the rest of {up.name}")
        coming = {row[0]: row for row in event.downloads}
        for dl in list(self.downloads_by_number.values()):
            if dl.transfer not in coming:
                self._fail_download(dl, "cancelled", gone, tell_host=False)
        for number, sender, name, size, to in coming.values():
            known = self.downloads_by_number.get(number)
            if known is not None and known.state is ReceiveState.WAITING:
                known.stale = True          # the person's answer says FileResume
            elif known is not None:
                link.offer(FileResume(number, known.received if
                                      known.state is ReceiveState.RECEIVING else known.size))
            elif number in self._saved:     # saved as the connection dropped
                link.offer(FileSaved(number))
            elif number in self.orphans:    # begun by the run of ours that crashed
                self._adopt(FileAnnounce(number, sender, name, size, to),
                            self.orphans[number]["part"])
            else:                           # its announcement was lost in the drop
                dl = self._announced(FileAnnounce(number, sender, name, size, to,
                                                    self.ask_above is not None),
                                       answer=False)
                if dl.state is ReceiveState.WAITING:
                    dl.stale = True
                else:
                    link.offer(FileResume(number, 0))

    async def settle_uploads(self, until: asyncio.Future) -> None:
        """Wait until every file we asked to send has reached the host (or
        failed), or `until` is done (the connection ended)."""
        for group in (lambda: list(self._sending),
                      lambda: [up.settled for up in self.uploads.values()]):
            pending = [f for f in group() if not f.done()]
            if pending:
                waiting = asyncio.gather(*pending, return_exceptions=True)
                await asyncio.wait([waiting, until], return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()

    def drop_downloads(self, reason: str) -> None:
        """We are leaving: drop, not write, what still comes."""
        for dl in list(self.downloads_by_number.values()):
            self._fail_download(dl, "cancelled", reason, tell_host=False)

    def close(self) -> None:
        """The core is stopping (its loop is gone): let the threads go."""
        self._read_io.shutdown(wait=False, cancel_futures=True)
        # Not cancelled: what is queued there includes deleting .part files.
        # Writes of failed downloads return at once, so this ends quickly.
        self._write_io.shutdown(wait=False)

    def _file_failed(self, base: dict, code: str, reason: str, **extra: Any) -> None:
        self.emit({"type": "file_failed", **base, "code": code, "reason": reason, **extra})

    # --- files we send ---

    async def send(self, path: Path, to: str) -> int | None:
        """Send the file at `path` to user `to`, or (to="") to the room.
        Returns the transfer number, or None if it was refused at once;
        how it goes arrives as events."""
        task = asyncio.current_task()       # before any await: a leave() queued
        if task is not None:                # after us must see us
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        loop = asyncio.get_running_loop()
        base = {"transfer": None, "name": path.name or str(path), "direction": "send",
                "to": to or None}

        def refuse(code: str, reason: str) -> None:
            self.emit({"type": "error", "code": code, "message": reason})
            self._file_failed(base, code, reason)

        link = self.link
        if link is None:
            refuse("not_connected", "not in a room")
            return None
        try:
            handle, size = await loop.run_in_executor(self._read_io, _open_regular, path)
        except OSError as exc:
            refuse("not_a_file", f"can't send {str(path)!r}: {exc.strerror or exc}")
            return None
        try:
            if self.host_max_file and size > self.host_max_file:
                refuse("file_too_large", f"{path.name} is {size} bytes; the host takes "
                       f"at most {self.host_max_file}")
                return None
            return await self._send(link, path, handle, size, to)
        finally:
            log_failure(loop.run_in_executor(self._read_io, handle.close),
                        f"closing {path}")

    async def _send(self, link: Link, path: Path, handle: Any, size: int,
                    to: str) -> int | None:
        loop = asyncio.get_running_loop()
        limits = self.limits
        self._next_transfer += 1
        up = OutgoingFile(self._next_transfer, path, path.name, size, to,
                          loop.create_future(), loop.create_future(),
                          Progress(size, limits.progress_interval_s))
        self.uploads[up.transfer] = up
        try:
            link.offer(FileOffer(up.transfer, up.name, size, to))
            self.emit(up.progress.event(up.base(), 0, force=True))
            if not await up.accepted:
                return None                 # refused: file_failed already emitted
            return await self._stream(link, up, handle, hashlib.sha256())
        except OSError as exc:
            self._read_failed(link, up, exc)
            return up.transfer

    async def _resume_upload(self, link: Link, up: OutgoingFile, offset: int) -> None:
        """Send the rest of `up` from `offset` (the host has the bytes before
        it); the hash is taken again over those, from the file."""
        loop = asyncio.get_running_loop()
        try:
            handle, size = await loop.run_in_executor(self._read_io, _open_regular, up.path)
        except OSError as exc:
            self._read_failed(link, up, exc)
            return
        try:
            if size != up.size or offset > size:
                raise OSError(errno.ESTALE, "the file changed while it was being sent")
            up.generation += 1
            generation = up.generation
            hasher = hashlib.sha256()
            await loop.run_in_executor(self._read_io, _hash_prefix, handle, offset,
                                       self.limits.file_io_bytes, hasher)
            if up.generation != generation:
                return                      # another resume overtook this one
            up.sent = offset
            await self._stream(link, up, handle, hasher)
        except OSError as exc:
            self._read_failed(link, up, exc)
        finally:
            log_failure(loop.run_in_executor(self._read_io, handle.close),
                        f"closing {up.path}")

    def _read_failed(self, link: Link, up: OutgoingFile, exc: OSError) -> None:
        if up.move("failed"):
            if not link.closing:
                link.offer(FileAbort(up.transfer, "file_io", f"read error: {exc}"))
            self._file_failed(up.base(), "file_io", f"can't read {up.name}: "
                              f"{exc.strerror or exc}")

    async def _stream(self, link: Link, up: OutgoingFile, handle: Any, hasher: Any) -> int:
        """Send `up`'s data from `up.sent` on (the file is read from there),
        then FileEnd. Returns when all is queued, or the link closed (the
        rest then waits for a resume)."""
        loop = asyncio.get_running_loop()
        limits, size = self.limits, up.size
        if up.sent:
            await loop.run_in_executor(self._read_io, handle.seek, up.sent)
        data = b""
        generation = up.generation
        while up.state is SendState.SENDING:
            want = min(limits.file_io_bytes, size - up.sent + 1)   # +1: notice growth
            if not await link.bulk_room():
                return up.transfer      # the link closed: the rest waits for a resume
            data = await loop.run_in_executor(self._read_io, _read_and_hash,
                                              handle, want, hasher)
            if up.generation != generation:
                return up.transfer      # a resume sends it now, on a new connection
            if not data or up.state is not SendState.SENDING:
                break
            if up.sent + len(data) > size:
                break                   # the file grew while we sent it
            view = memoryview(data)
            for start in range(0, len(view), MAX_CHUNK_BYTES):
                link.offer_chunk(up.transfer, view[start:start + MAX_CHUNK_BYTES])
            up.sent += len(data)
            self.emit(up.progress.event(up.base(), up.sent))
        if up.state is not SendState.SENDING:
            return up.transfer          # failed meanwhile: reported already
        if up.sent != size or data:
            up.move("failed")
            link.offer(FileAbort(up.transfer, "file_io", "the file changed while "
                                 "it was being sent"))
            self._file_failed(up.base(), "file_io", f"{up.name} changed while it "
                              "was being sent; send it again")
            return up.transfer
        up.sha256 = hasher.hexdigest()
        up.move("ended")
        link.offer_after_bulk(FileEnd(up.transfer, up.sha256))
        self.emit(up.progress.event(up.base(), up.sent, force=True))
        return up.transfer

    def _on_accept(self, event: FileAccept) -> None:
        up = self.uploads.get(event.transfer)
        if up is not None and up.move("accepted"):
            up.accepted.set_result(True)

    def _on_refuse(self, event: FileRefuse) -> None:
        up = self.uploads.get(event.transfer)
        if up is None:
            return
        if event.recipient:                 # one recipient failed; others go on
            # "cancelled" from a recipient is only ever its person's /cancel
            extra = {"by": event.recipient} if event.code == "cancelled" else {}
            up.recipient_answered = bool(up.to)
            self._file_failed(up.base(), event.code, event.reason, user=event.recipient,
                              **extra)
            return
        refused_at_once = up.state is SendState.OFFERED
        if up.move("failed"):
            if refused_at_once:
                self.emit({"type": "error", "code": event.code, "message": event.reason})
            self._file_failed(up.base(), event.code, event.reason)

    def _on_stored(self, event: FileStored) -> None:
        up = self.uploads.get(event.transfer)
        if up is not None and up.move("stored"):
            self.emit({"type": "file_sent", "transfer": up.transfer, "name": up.name,
                       "size": up.size, "sha256": up.sha256, "to": up.to or None})

    def _on_delivered(self, event: FileDelivered) -> None:
        up = self.uploads.get(event.transfer)
        if up is not None:
            up.recipient_answered = bool(up.to)
            self.emit({"type": "file_delivered", "transfer": up.transfer,
                       "name": up.name, "user": event.user})

    # --- files we receive (disk work on the write thread) ---

    def _on_announce(self, event: FileAnnounce) -> None:
        self._announced(event)              # a handler: what it returns is awaited

    def _announced(self, event: FileAnnounce, answer: bool = True) -> IncomingFile:
        """A file is coming. One the host holds for our word (`ask`) waits
        for `accept` or `decline` if it is larger than `ask_above`, else is
        taken at once (FileAccept, unless not `answer`: a resume says it)."""
        safe = safe_filename(event.name)
        tag = f"chatroom-{os.getpid()}-{secrets.token_hex(4)}"
        part = self.downloads / f".{safe}.{tag}.part"
        dl = IncomingFile(event.transfer, event.sender, event.name, safe, event.size,
                          event.to, part, Progress(event.size, self.limits.progress_interval_s))
        self.downloads_by_number[dl.transfer] = dl
        ask = event.ask and self.ask_above is not None and event.size > self.ask_above
        if ask:
            dl.state = ReceiveState.WAITING
        self.emit({"type": "file_offer", "transfer": dl.transfer, "from": dl.sender,
                   "name": safe, "size": dl.size, "to": dl.to or None, "ask": ask})
        if ask:
            return dl                       # no .part until the person says yes
        if event.ask and answer and self.link is not None:
            self.link.offer(FileAccept(dl.transfer))
        self._open(dl)
        return dl

    def _open(self, dl: IncomingFile) -> None:
        """Make `dl`'s .part file (on the write thread)."""
        first = not self._downloads_checked
        self._downloads_checked = True
        keep = frozenset(str(entry["part"]) for entry in self.orphans.values())
        self._write(dl, _open_part, dl, self.downloads, first, keep)

    def in_progress(self) -> list[dict]:
        """The downloads under way, as a crash-surviving record (PlaceStore)."""
        return [{"transfer": dl.transfer, "part": dl.part.name, "from": dl.sender,
                 "name": dl.name, "size": dl.size, "to": dl.to}
                for dl in self.downloads_by_number.values()
                if dl.state is ReceiveState.RECEIVING]

    def _adopt(self, event: FileAnnounce, part_name: str) -> None:
        """Go on with a download whose .part a crashed run of ours left:
        FileResume says what is on disk (0 if the .part is gone)."""
        safe = safe_filename(event.name)
        part = self.downloads / part_name
        if not _PART_RE.match(part_name) or part.parent != self.downloads:
            part = self.downloads / f".{safe}.chatroom-{os.getpid()}-" \
                f"{secrets.token_hex(4)}.part"
        dl = IncomingFile(event.transfer, event.sender, event.name, safe, event.size,
                          event.to, part, Progress(event.size, self.limits.progress_interval_s))
        self.downloads_by_number[dl.transfer] = dl
        self.emit({"type": "file_offer", "transfer": dl.transfer, "from": dl.sender,
                   "name": safe, "size": dl.size, "to": dl.to or None, "ask": False})

        def reopened(future: asyncio.Future) -> None:
            if future.cancelled() or dl.failed:
                return
            error = future.exception()
            if error is not None:           # unreadable: begin it again from nothing
                log.warning("could not reopen %s; downloading it again", dl.part,
                            exc_info=error)
            have = future.result() if error is None else 0
            if have > dl.size:
                self._fail_download(dl, "file_io", f"{safe}: the partial file is "
                                    "larger than the file")
                return
            dl.received = dl.written = have
            if have == 0 and dl.file is None:
                self._write(dl, _open_part, dl, self.downloads, False)
            if self.link is not None:
                self.link.offer(FileResume(dl.transfer, have))
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._write_io, _reopen_part, dl,
                                      self.limits.file_io_bytes)
        future.add_done_callback(reopened)

    def _on_chunk(self, chunk: Chunk) -> Any:
        """File data; returns an awaitable when the core must stop reading
        until it completes (our disk is behind)."""
        dl = self.downloads_by_number.get(chunk.transfer)
        if dl is None or dl.state is not ReceiveState.RECEIVING:
            return None                     # a download we gave up on: ignore
        if dl.received + len(chunk.data) > dl.size:
            self._fail_download(dl, "bad_frame", "more data than announced")
            return None
        dl.received += len(chunk.data)
        dl.batch.append(chunk.data)
        dl.batch_bytes += len(chunk.data)
        if dl.batch_bytes >= self.limits.file_io_bytes:
            self._flush_batch(dl)
        self.emit(dl.progress.event(dl.base(), dl.received))
        if len(dl.writes) > self.limits.disk_queue_writes:
            return asyncio.wait({dl.writes[0]})
        return None

    def _flush_batch(self, dl: IncomingFile) -> None:
        if dl.batch:
            batch, size = dl.batch, dl.batch_bytes  # chunks as received: no copy
            dl.batch, dl.batch_bytes = [], 0
            self._write(dl, _write_and_hash, dl, batch).add_done_callback(
                lambda f: self._wrote(dl, size, f))

    def _wrote(self, dl: IncomingFile, size: int, future: asyncio.Future) -> None:
        """A batch is on disk: the host may forget it (FileGot)."""
        if future.cancelled() or future.exception() is not None or dl.failed:
            return
        dl.written += size
        if self.link is not None and dl.state is ReceiveState.RECEIVING:
            self.link.offer(FileGot(dl.transfer, dl.written))

    def _write(self, dl: IncomingFile, job: Callable, *args: Any) -> asyncio.Future:
        """Run `job` on the write thread, in order; a failure fails `dl`."""
        future = asyncio.get_running_loop().run_in_executor(self._write_io, job, *args)
        dl.writes.append(future)

        def done(f: asyncio.Future) -> None:
            if dl.writes and dl.writes[0] is f:
                dl.writes.popleft()
            elif f in dl.writes:
                dl.writes.remove(f)
            if f.cancelled() or f.exception() is None or dl.failed:
                return
            exc = f.exception()
            code = "disk_full" if getattr(exc, "errno", None) == errno.ENOSPC else "file_io"
            reason = "the disk is full" if code == "disk_full" else \
                f"can't write {dl.safe_name}: {getattr(exc, 'strerror', '') or exc}"
            self._fail_download(dl, code, reason)
        future.add_done_callback(done)
        return future

    def _on_end(self, event: FileEnd) -> None:
        dl = self.downloads_by_number.get(event.transfer)
        if dl is None or dl.state is not ReceiveState.RECEIVING:
            return
        self._flush_batch(dl)
        if dl.received != dl.size:
            self._fail_download(dl, "bad_frame", f"got {dl.received} of {dl.size} bytes")
            return
        dl.move("ended")
        finish = self._write(dl, _finish_part, dl, event.sha256, self.downloads)

        def finished(f: asyncio.Future) -> None:
            if f.cancelled() or dl.failed or f.exception() is not None:
                return                      # an exception is reported by _write's callback
            path, digest = f.result()
            if path is None:
                self._fail_download(dl, "checksum_mismatch", f"{dl.safe_name} arrived "
                                    "damaged (SHA-256 mismatch); it was deleted")
                return
            dl.move("saved")
            self.downloads_by_number.pop(dl.transfer, None)
            self._saved[dl.transfer] = None
            while len(self._saved) > self.limits.max_transfers * 4:
                del self._saved[next(iter(self._saved))]
            self.emit(dl.progress.event(dl.base(), dl.received, force=True))
            self.emit({"type": "file_received", "transfer": dl.transfer,
                       "from": dl.sender, "name": path.name, "path": str(path),
                       "size": dl.size, "sha256": digest})
            if self.link is not None:
                self.link.offer(FileSaved(dl.transfer))
        finish.add_done_callback(finished)

    def _on_abort(self, event: FileAbort) -> None:
        dl = self.downloads_by_number.get(event.transfer)
        if dl is not None:
            # "cancelled" in a FileAbort is only ever the sender's /cancel
            extra = {"by": dl.sender} if event.code == "cancelled" else {}
            self._fail_download(dl, event.code, event.reason, tell_host=False, **extra)

    # --- what the person decides (on the loop; the core's thread-safe API) ---

    def _find(self, transfer: int, direction: str | None,
              waiting: bool = False) -> OutgoingFile | IncomingFile | None:
        """The file numbered `transfer` that a person may act on now (a
        download waiting for an answer, if `waiting`), or None after an
        `error{no_such_transfer}`."""
        dl = self.downloads_by_number.get(transfer)
        if dl is not None and waiting and dl.state is not ReceiveState.WAITING:
            dl = None
        up = None if waiting else self.uploads.get(transfer)
        if up is not None and (up.recipient_answered or up.state is SendState.FAILED):
            up = None
        if direction == "send":
            dl = None
        elif direction == "receive":
            up = None
        if dl is not None and up is not None:
            self.emit({"type": "error", "code": "no_such_transfer", "message":
                       f"both a file you send and one you receive are number {transfer}: "
                       f"say /cancel send {transfer} or /cancel receive {transfer}"})
            return None
        if dl is None and up is None:
            what = "no file waits for your answer" if waiting else "no file is on its way"
            self.emit({"type": "error", "code": "no_such_transfer",
                       "message": f"{what} as number {transfer} (the `transfer` of its "
                       "file_offer or file_progress)"})
            return None
        return dl or up

    def accept(self, transfer: int) -> bool:
        """Take download `transfer`, which waits for an answer: it comes now."""
        dl = self._find(transfer, "receive", waiting=True)
        if not isinstance(dl, IncomingFile) or not dl.move("accepted"):
            return False
        if self.link is not None:           # else a resume asks for it
            self.link.offer(FileResume(dl.transfer, 0) if dl.stale
                            else FileAccept(dl.transfer))
        dl.stale = False
        self._open(dl)
        self.emit(dl.progress.event(dl.base(), 0, force=True))
        return True

    def decline(self, transfer: int) -> bool:
        """Refuse download `transfer`, which waits for an answer: nothing of
        it touches the disk; the sender is told (file_failed, declined)."""
        dl = self._find(transfer, "receive", waiting=True)
        if not isinstance(dl, IncomingFile):
            return False
        self._fail_download(dl, "declined", "declined the file", by=self.user)
        return True

    def cancel(self, transfer: int, direction: str | None = None) -> bool:
        """Stop file `transfer` we send or receive, wherever it is: the
        other side is told at once, a download's .part is deleted."""
        found = self._find(transfer, direction)
        if found is None:
            return False
        if isinstance(found, IncomingFile):
            self._fail_download(found, "cancelled", "cancelled the download", by=self.user)
            return True
        if not found.move("cancelled"):
            return False
        if self.link is not None:
            self.link.offer(FileAbort(found.transfer, "cancelled", "the file will not come"))
        self._file_failed(found.base(), "cancelled", "cancelled the upload", by=self.user)
        return True

    def _fail_download(self, dl: IncomingFile, code: str, reason: str,
                       tell_host: bool = True, **extra: Any) -> None:
        """Give up on a download: delete its .part, tell the host and the UI."""
        if not dl.move("failed"):
            return
        dl.batch, dl.batch_bytes = [], 0
        self.downloads_by_number.pop(dl.transfer, None)
        log_failure(asyncio.get_running_loop().run_in_executor(
            self._write_io, _discard_part, dl), f"removing {dl.part}")
        if tell_host and self.link is not None:
            self.link.offer(FileRefuse(dl.transfer, code, reason))
        self._file_failed(dl.base(), code, reason, **extra)


# --- Disk work (on ClientFiles' threads, never the loop) ---------------------

def _open_regular(path: Path) -> tuple[Any, int]:
    """An open regular file and its size; OSError for anything else."""
    handle = open(path, "rb", buffering=0)  # noqa: SIM115 (the caller closes it)
    try:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
    except BaseException:
        handle.close()
        raise
    return handle, info.st_size


def _read_and_hash(handle: Any, size: int, hasher: Any) -> bytes:
    data = handle.read(size)
    hasher.update(data)                     # releases the GIL for large buffers
    return data


def _hash_prefix(handle: Any, size: int, step: int, hasher: Any) -> None:
    """Hash the first `size` bytes of `handle` (then at `size`)."""
    handle.seek(0)
    while size > 0:
        data = handle.read(min(step, size))
        if not data:
            raise OSError(errno.ESTALE, "the file shrank while it was being sent")
        hasher.update(data)
        size -= len(data)


def _open_part(dl: IncomingFile, folder: Path, first: bool,
               keep: frozenset[str] = frozenset()) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if first:
        remove_stale_parts(folder, keep)
    if shutil.disk_usage(folder).free < dl.size:
        raise OSError(errno.ENOSPC, "not enough free space for the file")
    descriptor = os.open(dl.part, os.O_WRONLY | os.O_CREAT | os.O_EXCL |
                         getattr(os, "O_BINARY", 0), 0o644)
    dl.file = os.fdopen(descriptor, "wb", buffering=0)


def _write_and_hash(dl: IncomingFile, chunks: list[Any]) -> None:
    if dl.failed or dl.file is None:
        return
    for chunk in chunks:
        view = memoryview(chunk)
        while view:                         # a raw write may be partial
            view = view[dl.file.write(view):]
        dl.hasher.update(chunk)             # releases the GIL for large buffers


def _finish_part(dl: IncomingFile, expected: str, folder: Path) -> tuple[Path | None, str]:
    """Close, verify and name the download. (None, digest) on a mismatch,
    after deleting the .part; (final path, digest) when it matches."""
    dl.file.close()
    dl.file = None
    digest = dl.hasher.hexdigest()
    if digest != expected:
        dl.part.unlink(missing_ok=True)
        return None, digest
    return claim_name(dl.part, folder, dl.safe_name), digest


def _reopen_part(dl: IncomingFile, io_bytes: int) -> int:
    """Open the .part of a download a previous run of ours began, to go on
    writing it; its bytes are hashed again. Returns how many there are."""
    dl.file = open(dl.part, "r+b", buffering=0)    # noqa: SIM115 (closed when done)
    try:
        while data := dl.file.read(io_bytes):
            dl.hasher.update(data)
        return dl.file.tell()
    except BaseException:
        dl.file.close()
        dl.file = None
        raise


def _discard_part(dl: IncomingFile) -> None:
    if dl.file is not None:
        dl.file.close()
        dl.file = None
    try:
        dl.part.unlink(missing_ok=True)
    except OSError:
        pass

# =============================================================================
# 17. CLIENT MEDIA: the links of a call and the threads that move their media
# =============================================================================
# A call's media, under the signalling of CLIENT CALLS (next section): the
# table of links, each with its keys, where its media goes and what has
# come from it; sealing and sending, opening and sorting what comes in; and
# the threads, each with one job:
# - the receiving threads (one per UDP socket: CONNECTIONS' UdpSocket) and
#   the core's loop (for packets the host relays) call `on_packet`: open,
#   reassemble and repair (a Nack for what parity can't rebuild, then a
#   keyframe request), queue frames to decode at the time LipSync gives,
#   push audio into jitter buffers, answer Nacks from the fragments we
#   keep, feed Reports to the rate controller, and send our own Reports;
#   and it answers what is news for a call (`Heard`: a link's first
#   packet, its peer's bye);
# - the video thread: read the camera, encode once per codec in use at the
#   settings its RateController gives (the worst link decides), cut into
#   packets with parity, seal and send them to every link (the same
#   packets, each sealed with its link's key), paced so bursts don't
#   overflow receivers; a send never waits (UdpSocket), so one congested
#   peer can't hold up the others' video;
# - the decoding thread: decode each link's frames when they are due,
#   show and record them;
# - the audio source's and sink's threads (or PyAudio's callbacks): take the
#   echo, noise and rumble out of the microphone's 20 ms frames, encode and
#   send them; pull, decode, repair (Opus FEC) or conceal, and mix what is
#   played, which is also what the echo canceller listens for.
# The threads run while there are links: each ends once the last link has
# gone (`_retire`), so a finished call leaves no thread and no device open,
# and the next link starts them again. Both happen under the lock, so a
# link that comes just as a thread ends gets a new one. Every shared
# structure is guarded by a lock held briefly. The engine decides nothing
# about calls: CLIENT CALLS adds and removes links. A device that can't
# open is reported once a call, and the call goes on without it.

_SEND_PACE_EVERY = 8                # packets of one frame sent back to back, then a pause
_SEND_PACE_S = 0.0005
_DECODE_QUEUE = 8                   # frames overdue for decoding per link, at most
_DECODE_HELD = 64                   # frames waiting for their time per link, at most


@dataclasses.dataclass(frozen=True)
class MediaOptions:
    """How this client takes part in calls (the flags of MAIN)."""
    camera: str = "0"               # --camera: an index, a video file, "test" or "none"
    audio: str = "default"          # --audio: "default", an index, "tone", "null", a .wav
    media_path: str = "auto"        # --media-path: auto, direct or relay
    record: str | None = None       # --record DIR
    media_port: int = 0             # --media-port: UDP port for host-arranged calls
    interface: str | None = None    # --interface: bind media sockets to this address
    video_codec: str = "auto"       # --video-codec: offer only this one (auto: all)
    echo_cancel: bool = True        # --no-echo-cancel turns it (and noise, gain) off
    video_repair: str = "both"      # --video-repair: both, nack, parity or none
    video_adapt: bool = True        # --no-video-adapt: always send at the full rate
    lip_sync: bool = True           # --no-lip-sync: show video as soon as it is decoded


class PeerLink:
    """One link of this client: the keys, where media goes, and what has
    been received from the peer. `recv_lock` guards the receiving state,
    `send_lock` the Sealer (several threads send)."""

    def __init__(self, peer: str, link_id: bytes, link_key: bytes, i_am_a: bool,
                 video: str, audio: str, sock: UdpSocket | None,
                 address: tuple[str, int] | None, direct: bool,
                 safety_code: str | None = None, repair: str = "both") -> None:
        send_key, receive_key = direction_keys(link_key, i_am_a)
        now = time.monotonic()
        self.peer = peer
        self.link_id = link_id
        self.sealer = Sealer(link_id, send_key)
        self.opener = Opener(link_id, receive_key)
        self.video = video                  # codec name, "" = no video on this link
        self.audio = audio
        self.sock = sock                    # None: the host knew no UDP port for them
        self.address = address
        self.direct = direct                # a direct call: no host, no relay
        self.safety_code = safety_code
        self.connected = not direct         # a direct call connects on its first packet
        self.bye = False                    # they said they hung up (CONTROL_BYE)
        self.relay_out = False              # we send through the host's relay
        self.relay_asked = False            # we asked them to relay to us
        self.started = now
        self.heard = 0.0                    # last authenticated packet (monotonic s)
        self.heard_udp = 0.0
        self.heard_relay = 0.0
        self.sent = 0.0
        self.recv_lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.video_in = VideoReceiver(repair=repair in ("nack", "both"))
        self.meter = ReportMeter(now * 1000)    # what our Reports to them say
        self.report_due = 0.0               # when our next Report goes (ms)
        self.resender: Retransmitter | None = None      # answers their Nacks
        self.reported: dict[str, int] = {}  # repair counters at the last media_stats
        self.sent_bytes = 0                 # everything we sent them (send_lock)
        self.sent_mark = (0, now * 1000)    # (sent_bytes, when) at their last Report
        # Opus rebuilds a lost frame from the next packet: while packets go
        # missing, wait one frame more so that the next one is here in time.
        self.jitter = JitterBuffer(repair_frames=1 if audio == "opus" else 0)
        self.playout = Playout(SILENCE)     # decoding, repair, and the level of their voice
        self.sync = LipSync()               # their video against their voice
        self.stats = LinkStats(now * 1000)
        # (when to decode it, ms; the frame), in order: a frame waits for its sound.
        # (when to decode it, the frame, how long lip sync holds it back)
        self.to_decode: collections.deque[tuple[float, Frame, float]] = collections.deque()
        self.video_decoder: Any = None      # made on the decoding thread
        self.audio_decoder: Any = None      # made on the audio sink's thread
        self.latest_frame: Any = None       # the newest decoded frame (a BGR array)
        self.frames_shown = 0
        self.concealed_reported = 0         # the jitter buffer's count at the last stats
        self.recovered_reported = 0         # the same for frames rebuilt by FEC

    @property
    def path(self) -> str:
        """How media moves now: "relay" if either way goes through the host."""
        return "relay" if self.relay_out or self.heard_relay > self.heard_udp else "direct"


@dataclasses.dataclass(frozen=True)
class Heard:
    """What a packet means to the calls (MediaEngine.on_packet): the first
    packet `link` heard (it is connected), or the first bye from its peer."""
    link: PeerLink
    first: bool
    bye: bool


def call_soon(loop: asyncio.AbstractEventLoop, function: Callable[..., Any],
              *args: Any) -> None:
    """Hand `function(*args)` to the core's loop from a media thread. Once the
    loop is closed (the client is ending, the threads not yet joined) there
    is nobody to tell: the call is dropped, not raised into the thread."""
    with contextlib.suppress(RuntimeError):     # "Event loop is closed"
        loop.call_soon_threadsafe(function, *args)


class MediaEngine:
    """The media of every link of one client. Thread-safe throughout.

    `emit(event)` hands an event to the front end and `relay(packet)` sends
    a packet through the host; the engine calls both on `loop`.
    """

    def __init__(self, options: MediaOptions, emit: Callable[[dict], None],
                 relay: Callable[[bytes], None], loop: asyncio.AbstractEventLoop) -> None:
        self.options = options
        self.emit = emit
        self.relay = relay
        self.loop = loop
        self.user = ""                      # our User ID (the test pattern shows it)
        self.muted = False
        self.camera_on = options.camera != "none"
        self.preview: Any = None            # the newest frame from our camera
        self.preview_serial = 0             # counts them (the window shows new ones)
        self.garbage = 0                    # packets for no link at all
        self.lock = threading.RLock()
        self._links: dict[str, PeerLink] = {}       # by peer name
        self._by_id: dict[bytes, PeerLink] = {}
        self._keyframes: set[str] = set()           # codecs a peer asked a keyframe of
        self._closed = threading.Event()
        self._wake_video = threading.Event()
        self._wake_decode = threading.Condition()
        self._audio_wanted = threading.Event()
        self._reported: set[str] = set()            # device errors said, once a call
        self._audio_seq = 0
        self._recorder: Any = None
        self._threads: list[threading.Thread] = []
        # What each video stream (one per codec) sent lately, for Nacks, and how it
        # is sent: the video thread and the receiving threads share them.
        self._video_lock = threading.Lock()
        self._parity = options.video_repair in ("parity", "both")
        self._caches: dict[str, FragmentCache] = {}
        self._rates: dict[str, RateController] = {}
        self._voice: VoiceProcessor | None = None   # while the audio devices are open
        self._voice_failed = False                  # it would not load: logged once
        self._sound_spec: str | None = None         # what the open devices are (else None)
        self._my_level = LevelMeter()               # our microphone, as sent

    # --- links ---

    def links(self) -> list[PeerLink]:
        with self.lock:
            return list(self._links.values())

    def link(self, peer: str) -> PeerLink | None:
        return self._links.get(peer)

    def add(self, link: PeerLink) -> None:
        """A new link (one with the same peer goes); starts the threads."""
        with self.lock:
            old = self._links.get(link.peer)
            if old is not None:
                self.forget(old)
            self._links[link.peer] = link
            self._by_id[link.link_id] = link
            if link.video:
                self._keyframes.add(link.video)     # a newcomer needs a keyframe
                with self._video_lock:
                    cache = self._caches.setdefault(link.video, FragmentCache())
                link.resender = Retransmitter(cache)
            self._start_threads()
        self._wake_video.set()
        self._audio_wanted.set()

    def forget(self, link: PeerLink) -> bool:
        """Take `link` out; False if it wasn't in (already gone, or replaced)."""
        with self.lock:
            self._by_id.pop(link.link_id, None)
            if self._links.get(link.peer) is not link:
                return False
            del self._links[link.peer]
            with self._video_lock:
                for rate in self._rates.values():
                    rate.forget(link.peer)
            if not self._links:
                self._audio_wanted.clear()
                self._reported.clear()      # the next call says its device problems
            return True

    def send(self, link: PeerLink, kind: int, inner: bytes) -> None:
        """Seal and send one packet to `link`."""
        with link.send_lock:
            packet = link.sealer.seal(kind, inner)
            link.sent_bytes += len(packet)
        link.sent = time.monotonic()
        if link.relay_out and not link.direct:
            call_soon(self.loop, self.relay, packet)
        elif link.sock is not None and link.address is not None:
            link.sock.send(packet, link.address)

    def stats(self, link: PeerLink, now: float) -> dict:
        """media_stats for `link` since the last call (the core's clock): what
        comes from them (LinkStats' fields, concealed, the repair counters,
        av_skew_ms) and how our video goes to them (send_*, None without)."""
        with link.recv_lock:
            frames, controls = link.video_in.poll(now * 1000)
            timed = self._schedule(link, frames, now * 1000)
            stats = link.stats.snapshot(now * 1000)
            concealed, recovered = link.jitter.concealed, link.jitter.recovered
            stats["jitter_ms"] = link.jitter.target_ms
            stats["av_skew_ms"] = link.sync.skew()
            r = link.video_in.reassembler
            counts = {"repaired": r.repaired + r.recovered, "video_lost": r.incomplete,
                      "nacks": link.video_in.nacks, "keyframes": link.video_in.gate.requests,
                      "resent": link.resender.resent if link.resender is not None else 0}
        self._take_frames(link, timed, controls, now * 1000)
        stats["concealed"] = concealed - link.concealed_reported
        stats["fec"] = recovered - link.recovered_reported
        link.concealed_reported, link.recovered_reported = concealed, recovered
        stats["dropped"] += self.garbage
        for name, count in counts.items():
            stats[name] = count - link.reported.get(name, 0)
        link.reported = counts
        with self._video_lock:
            rate = self._rates.get(link.video) if link.video else None
            sending = rate.settings if rate is not None else None
        return {"type": "media_stats", "peer": link.peer, **stats, "path": link.path,
                "send_kbps": sending and round(sending.bitrate / 1000),
                "send_fps": sending and sending.fps,
                "send_width": sending and sending.width,
                "send_height": sending and sending.height}

    # --- what the person does ---

    def set_muted(self, muted: bool) -> None:
        self.muted = muted

    def set_camera(self, on: bool) -> None:
        self.camera_on = on and self.options.camera != "none"
        self._reported.discard("no_camera")         # try the camera again
        self._wake_video.set()

    @property
    def echo_cancelling(self) -> bool:
        """Is the microphone's echo cancelled? While the sound is open:
        whether the echo canceller runs (False after --no-echo-cancel, without
        livekit, when it would not load or once it failed, and for a stand-in:
        tone, null, a WAV file, or the null device a missing one falls back
        to); before: whether it would. Any thread."""
        voice = self._voice
        if voice is not None:
            return voice.working
        if self._sound_spec is not None:    # open without one
            return False
        return (self.options.echo_cancel and is_device_spec(self.options.audio)
                and not self._voice_failed and echo_canceller_available())

    @property
    def needs_headphones(self) -> bool:
        """A real microphone with no echo canceller (see echo_cancelling):
        with speakers, the peers hear themselves, so the window suggests
        headphones. Any thread."""
        spec = self._sound_spec or self.options.audio
        return is_device_spec(spec) and not self.echo_cancelling

    def levels(self) -> dict[str, float]:
        """How loud each voice is now, for a speaking indicator: dBFS of the
        last 200 ms (LEVEL_FLOOR_DBFS for silence; over SPEAKING_DBFS counts as
        speaking) of what each peer's link plays, by peer name, and of what we
        send under our own user name (the floor while muted). Any thread."""
        found = {link.peer: link.playout.meter.dbfs for link in self.links() if link.audio}
        found[self.user] = self._my_level.dbfs
        return found

    def latest_frame(self, peer: str) -> tuple[int, Any]:
        """(serial, newest decoded frame) from `peer`, for the window: the
        serial grows with every frame, so an unchanged one is skipped; (0,
        None) before the first. Any thread: it only reads two attributes."""
        link = self._links.get(peer)
        return (link.frames_shown, link.latest_frame) if link is not None else (0, None)

    # --- receiving (socket threads, and the loop for relayed packets) ---

    def on_packet(self, data: bytes, via: str) -> Heard | None:
        """A media packet that came by `via` ("udp" or "relay"). Returns
        news for the calls if it is the first packet its link has heard, or
        the first bye (only a packet that authenticates counts), else None."""
        header = peek_header(data)
        link = self._by_id.get(header[1]) if header is not None else None
        if link is None:
            self.garbage += 1
            return None
        now = time.monotonic()
        now_ms = now * 1000
        frames: list[Frame] = []
        controls: list[bytes] = []          # to send back to them
        again: list[bytes] = []             # video they asked for again
        with link.recv_lock:
            opened = link.opener.open(data)
            if opened is None:
                link.stats.refused()
                return None
            kind, seq, inner = opened
            link.heard = now
            if via == "udp":
                link.heard_udp = now
            else:
                link.heard_relay = now
            link.stats.packet(seq, len(data), now_ms)
            link.meter.packet(seq, len(data), now_ms)
            first, link.connected = not link.connected, True
            bye = False
            if kind == KIND_VIDEO:
                capture_ms = video_capture_ms(inner)
                if capture_ms is not None:
                    link.meter.transit(capture_ms, time.time() * 1000)
                frames, controls = link.video_in.packet(inner, now_ms)
            elif kind == KIND_AUDIO:
                frame_in = unpack_audio(inner)
                if frame_in is not None and AUDIO_CODEC_IDS.get(link.audio) == frame_in.codec:
                    link.jitter.push(frame_in.seq, frame_in.payload, now_ms)
                    link.sync.audio_arrived(frame_in.seq, frame_in.capture_ms)
                    link.stats.audio_frame()
            else:
                control = unpack_control(inner)
                if isinstance(control, Control) and control.type == CONTROL_BYE:
                    bye, link.bye = not link.bye, True      # news once: they send a few
                again = self._on_control(link, control, now_ms)
            if link.video and kind != KIND_VIDEO:   # a repair's time may be up
                more, also = link.video_in.poll(now_ms)
                frames, controls = frames + more, controls + also
            if link.video and now_ms >= link.report_due:
                link.report_due = now_ms + REPORT_INTERVAL_MS
                controls.append(pack_control(link.meter.report(now_ms)))
            timed = self._schedule(link, frames, now_ms)
        self._take_frames(link, timed, controls, now_ms)
        for inner_again in again:
            self.send(link, KIND_VIDEO, inner_again)
        return Heard(link, first, bye) if first or bye else None

    def _on_control(self, link: PeerLink, control: Control | Nack | Report | None,
                    now_ms: float) -> list[bytes]:
        """A control message from `link` (recv_lock held): the video fragments
        to send them again, if they asked for some."""
        if control is None or not link.video:
            return []
        if isinstance(control, Nack):
            if link.resender is None:
                return []
            with self._video_lock:
                return link.resender.answer(control, now_ms)
        if isinstance(control, Report):
            with link.send_lock:
                sent = link.sent_bytes
            (was, since), link.sent_mark = link.sent_mark, (sent, now_ms)
            sent_kbps = (sent - was) * 8 / (now_ms - since) if now_ms > since else None
            if self.options.video_adapt:
                with self._video_lock:
                    rate = self._rates.get(link.video)
                    if rate is not None:
                        rate.report(link.peer, control, now_ms, sent_kbps)
            return []
        if control.type == CONTROL_KEYFRAME:
            self._keyframes.add(link.video)
        return []

    def _schedule(self, link: PeerLink, frames: list[Frame],
                  now_ms: float) -> list[tuple[float, Frame, float]]:
        """When to decode each frame: with its sound (recv_lock held); and
        how long that holds it back."""
        if not self.options.lip_sync:
            return [(now_ms, frame, 0.0) for frame in frames]
        due = [(link.sync.video_due(frame.capture_ms, now_ms), frame) for frame in frames]
        return [(when, frame, max(0.0, when - now_ms)) for when, frame in due]

    def _take_frames(self, link: PeerLink, frames: list[tuple[float, Frame, float]],
                     controls: list[bytes], now_ms: float) -> None:
        """Queue frames for the decoder; send the control messages (any thread)."""
        if frames:
            with self._wake_decode:
                link.to_decode.extend(frames)
                queue = link.to_decode
                if len(queue) > _DECODE_HELD or (      # we can't keep up
                        len(queue) > _DECODE_QUEUE and queue[_DECODE_QUEUE][0] <= now_ms):
                    queue.clear()
                    with link.recv_lock:
                        controls = controls + link.video_in.decoder_failed(now_ms)
                self._wake_decode.notify()
        for inner in controls:
            self.send(link, KIND_CONTROL, inner)

    # --- the threads: video out, video in, audio ---

    def _start_threads(self) -> None:
        """Start the media threads that aren't running (with the lock held)."""
        running = {thread.name for thread in self._threads}
        for target, name in ((self._video_loop, "video-out"), (self._decode_loop, "video-in"),
                             (self._audio_loop, "audio")):
            if name not in running:
                thread = threading.Thread(target=target, name=name, daemon=True)
                self._threads.append(thread)
                thread.start()
        if self.options.record and self._recorder is None:
            try:
                self._recorder = Recorder(Path(self.options.record))
            except (OSError, DeviceError) as exc:
                self._report("file_io", f"can't record to {self.options.record}: {exc}")

    def _retire(self) -> bool:
        """A media thread asks whether to end: yes once no link is left (or
        we are closing); it leaves `_threads` then, under the lock."""
        with self.lock:
            if self._links and not self._closed.is_set():
                return False
            current = threading.current_thread()
            self._threads = [thread for thread in self._threads if thread is not current]
            return True

    def _report(self, code: str, message: str) -> None:
        """A device problem, said once a call (any thread)."""
        if code not in self._reported:
            self._reported.add(code)
            call_soon(self.loop, self.emit, {"type": "error", "code": code,
                                             "message": message})

    def _video_loop(self) -> None:
        source: Any = None
        encoders: dict[str, Any] = {}
        frame_ids: dict[str, int] = {}
        try:
            while True:
                links = [link for link in self.links() if link.video and link.connected]
                if not links or not self.camera_on or self._closed.is_set():
                    if source is not None:      # nobody watches: let the camera go
                        source.close()
                        source = None
                        self.preview, self.preview_serial = None, self.preview_serial + 1
                    if self._retire():
                        return
                    self._wake_video.wait(_UDP_POLL_S)
                    self._wake_video.clear()
                    continue
                if source is None:
                    try:
                        source = open_video_source(self.options.camera, self.user)
                    except (DeviceError, MissingPackage) as exc:
                        self._report("no_camera", f"no video: {_why(exc)}; the call goes on "
                                     "without it")
                        self.camera_on = False
                        call_soon(self.loop, self.emit, {
                            "type": "media_state", "muted": self.muted, "video": False})
                        continue
                frame = source.read()
                if frame is None:
                    continue
                self.preview, self.preview_serial = frame, self.preview_serial + 1
                capture_ms = int(time.time() * 1000)
                now_ms = time.monotonic() * 1000
                for codec in sorted({link.video for link in links}):
                    encoder = encoders.get(codec)
                    if encoder is None:
                        try:
                            encoder = encoders[codec] = make_video_encoder(codec)
                        except (DeviceError, MissingPackage) as exc:
                            self._report("missing_package", f"can't encode {codec}: {_why(exc)}")
                            continue
                    with self._video_lock:
                        rate = self._rates.get(codec)
                        if rate is None:
                            rate = self._rates[codec] = RateController(
                                VIDEO_BITRATE if codec == "vp8" else JPEG_BITRATE,
                                VIDEO_WIDTH, VIDEO_HEIGHT, VIDEO_FPS)
                        sending = rate.update(now_ms)
                        if not rate.take_frame(now_ms):
                            continue
                        full = sending.bitrate >= rate.max_bitrate
                    encoder.configure(sending.bitrate, sending.fps, sending.width,
                                      sending.height)
                    out = encoder.encode(frame, keyframe=codec in self._keyframes)
                    self._keyframes.discard(codec)
                    if out is None:
                        continue
                    frame_ids[codec] = frame_ids.get(codec, 0) + 1
                    # Parity only at the full rate: below it bandwidth is what is
                    # short, and frames of one to three fragments would spend a
                    # third to a half of it on parity (one fragment's parity is a
                    # copy); a Nack costs next to nothing (bench/video_sim.py).
                    inners = fragment(frame_ids[codec], out[0], capture_ms, out[1],
                                      VIDEO_CODEC_IDS[codec], parity=self._parity and full)
                    with self._video_lock:
                        self._caches.setdefault(codec, FragmentCache()).add(
                            frame_ids[codec], inners)
                    targets = [link for link in links if link.video == codec]
                    for number, inner in enumerate(inners, 1):
                        for link in targets:
                            self.send(link, KIND_VIDEO, inner)
                        if number % _SEND_PACE_EVERY == 0:
                            time.sleep(_SEND_PACE_S)
        except Exception as exc:            # a codec or device failed mid-call
            log.exception("the video thread failed")
            self._report("no_camera", f"video stopped: {_why(exc)}")
        finally:
            if source is not None:
                source.close()
            for encoder in encoders.values():
                encoder.close()

    def _decode_loop(self) -> None:
        while True:
            links = self.links()
            with self._wake_decode:
                now_ms = time.monotonic() * 1000
                work, wait_s = [], _UDP_POLL_S
                for link in links:
                    queue = link.to_decode
                    while queue and queue[0][0] <= now_ms:
                        _due, frame, held_ms = queue.popleft()
                        work.append((link, frame, held_ms))
                    if queue:               # the next frame waits for its sound
                        wait_s = min(wait_s, (queue[0][0] - now_ms) / 1000)
                if not work and not self._closed.is_set() and links:
                    self._wake_decode.wait(wait_s)
                    continue
            if not work or self._closed.is_set():
                if self._retire():
                    return
                continue
            for link, frame, held_ms in work:
                self._decode(link, frame, held_ms)

    def _decode(self, link: PeerLink, frame: Frame, held_ms: float = 0.0) -> None:
        if link.video_decoder is None:
            try:
                link.video_decoder = make_video_decoder(link.video)
            except (DeviceError, MissingPackage) as exc:
                self._report("missing_package", f"can't decode {link.video}: {_why(exc)}")
                return
        image = link.video_decoder.decode(frame.data)
        now = time.monotonic()
        if image is None:
            with link.recv_lock:
                requests = link.video_in.decoder_failed(now * 1000)
            for inner in requests:
                self.send(link, KIND_CONTROL, inner)
            return
        link.latest_frame = image
        link.frames_shown += 1
        with link.recv_lock:
            link.stats.frame_shown(frame.capture_ms, time.time() * 1000, held_ms)
            link.sync.video_shown(frame.capture_ms, now * 1000)
        if self._recorder is not None:
            self._recorder.frame(link.peer, image, now)

    def _audio_loop(self) -> None:
        """Opens the audio devices while there are links, closes them after."""
        source: Any = None
        sink: Any = None
        try:
            while True:
                if self._closed.is_set() or not self._audio_wanted.wait(_UDP_POLL_S):
                    self._close_audio(source, sink)
                    source = sink = None
                    if self._retire():
                        return
                    continue
                if source is None and sink is None:
                    source, sink = self._open_audio()
                self._closed.wait(_UDP_POLL_S)
        finally:
            self._close_audio(source, sink)

    def _open_audio(self) -> tuple[Any, Any]:
        spec = self.options.audio
        try:
            source = open_audio_source(spec)
            sink = open_audio_sink(spec)
        except (DeviceError, MissingPackage) as exc:
            self._report("no_audio_device", f"no sound: {_why(exc)}; the call goes on "
                         "without it")
            source, sink = open_audio_source("null"), open_audio_sink("null")
        self._voice = self._open_voice(source.spec)
        self._sound_spec = source.spec
        encoders: dict[str, Any] = {}
        source.start(lambda pcm: self._on_audio(pcm, encoders))
        sink.start(self._pull_audio)
        return source, sink

    def _open_voice(self, spec: str) -> VoiceProcessor | None:
        """The echo canceller for the devices `spec` opened, if wanted and there."""
        if not self.options.echo_cancel or not is_device_spec(spec):
            return None
        try:
            return VoiceProcessor()
        except DeviceError as exc:          # calls work without it: say so, once
            if not self._voice_failed:
                self._voice_failed = True
                log.warning("no echo cancelling (%s); with speakers, peers hear "
                            "themselves: use headphones", exc.message)
            return None

    def _close_audio(self, source: Any, sink: Any) -> None:
        for device in (source, sink):
            if device is not None:
                device.stop()
        self._sound_spec = None                     # first: echo_cancelling reads it second
        voice, self._voice = self._voice, None      # after the devices: none uses it now
        if voice is not None:
            voice.close()
        self._my_level = LevelMeter()

    def _on_audio(self, pcm: bytes, encoders: dict[str, Any]) -> None:
        """20 ms from the microphone (its thread): clean it, meter it, encode
        once per codec, send."""
        voice = self._voice
        if voice is not None:               # muted too: the canceller keeps its bearings
            pcm = voice.capture(pcm)
        self._my_level.add(SILENCE if self.muted else pcm)
        if self.muted:
            return
        links = [link for link in self.links() if link.audio and link.connected]
        if not links:
            return
        self._audio_seq += 1
        capture_ms = int(time.time() * 1000)
        for codec in {link.audio for link in links}:
            encoder = encoders.get(codec)
            if encoder is None:
                encoder = encoders[codec] = make_audio_encoder(codec)
            inner = pack_audio(AudioFrame(self._audio_seq, capture_ms, AUDIO_CODEC_IDS[codec],
                                          encoder.encode(pcm)))
            for link in links:
                if link.audio == codec:
                    self.send(link, KIND_AUDIO, inner)

    def _pull_audio(self) -> bytes:
        """The next 20 ms to play (the sink's thread): every peer's frame,
        decoded, rebuilt from FEC or concealed, recorded, mixed; the mix is
        what the echo canceller listens for in the microphone."""
        frames = []
        for link in self.links():
            if not link.audio:
                continue
            with link.recv_lock:
                status, payload = link.jitter.pop(fec=True)
                seq = link.jitter.last_seq if status != "empty" else None
                if self.options.lip_sync:
                    status, payload, seq = link.sync.delay_audio(status, payload, seq)
                link.sync.audio_played(seq, time.monotonic() * 1000)
            if link.audio_decoder is None:
                try:
                    link.audio_decoder = make_audio_decoder(link.audio)
                except (DeviceError, ValueError) as exc:
                    self._report("missing_package", f"can't decode {link.audio}: {_why(exc)}")
                    link.audio = ""         # no sound from this link, the rest goes on
                    continue
            pcm = link.playout.render(status, payload, link.audio_decoder)
            frames.append(pcm)
            if self._recorder is not None:
                self._recorder.audio(link.peer, pcm)
        played = mix(frames) if frames else SILENCE
        voice = self._voice
        if voice is not None:
            voice.play(played)
        return played

    # --- the end ---

    def close(self) -> None:
        """Stop every thread and device and forget every link (any thread
        but the core's loop: it joins threads). Sockets are CLIENT CALLS'."""
        self._closed.set()
        self._wake_video.set()
        with self._wake_decode:
            self._wake_decode.notify_all()
        with self.lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(STOP_TIMEOUT_S)
        for link in self.links():
            self.forget(link)
        if self._recorder is not None:
            self._recorder.close()


# =============================================================================
# 18. CLIENT CALLS: calls with the host and direct ones, over the media engine
# =============================================================================
# ClientCalls is to calls what ClientFiles is to files: ClientCore (next
# section) owns it, hands it the host's call events and the commands a
# person types, and ticks it once a second while logged in or `busy` (a call
# needs its clock with no host connection too: direct calls never use one,
# host-arranged ones go on through a drop); it talks to the host through the
# core and to the front end through `emit`. It sets up every link this
# client is in, host-arranged (/CHECK) or direct ("ip port1 port2": the
# hello and key agreement of MEDIA PACKETS), hands each to the MediaEngine
# (CLIENT MEDIA), and watches them: the UDP sockets' traffic goes to the
# engine, the clock checks that each link is alive, falls back to the host's
# relay, keeps quiet links open and reports media_stats.
#
# Rules (README.md, "Calls"): media is sealed per link and accepted because
# it authenticates; a link that hears nothing over UDP for
# `media_fallback_s` asks for the host's relay (--media-path auto); one that
# hears nothing at all for `media_silence_s` ends (`lost`). Hanging up a
# direct call, or stopping in one, sends its peer a sealed bye a few
# times, and a bye that authenticates ends the link at once (`hangup`);
# the host tells the peers of the links it arranged, so none goes there.

_HELLO_EVERY_S = 0.25               # a direct call repeats its hello this often
_BYE_TIMES = 3                      # a direct call's bye is sent this many times,
_BYE_EVERY_S = 0.05                 # this far apart: one may be lost


@dataclasses.dataclass(eq=False)
class DirectCall:
    """A direct call waiting for the other side's hello (then `link`)."""
    name: str                           # "ip:port", until the hello names them
    address: tuple[str, int]
    sock: UdpSocket
    keys: KeyExchange
    started: float
    link: PeerLink | None = None


class ClientCalls:
    """Every call of one client. Thread-safe where it says so; the `on_*`
    handlers, commands and `tick` run on the core's loop. `media` is the
    engine (muting, the camera and frames for the window are its).

    `emit(event)` hands an event to the front end (on the loop); `to_host`
    sends an event to the host over the core's Link, if connected.
    """

    def __init__(self, limits: Limits, options: MediaOptions,
                 emit: Callable[[dict], None], to_host: Callable[[Event], bool],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.limits = limits
        self.options = options
        self.emit = emit
        self.to_host = to_host
        self.loop = loop
        self.media = MediaEngine(options, emit, self._relay, loop)
        self.user = ""                      # our User ID, once logged in
        self.link: Link | None = None       # the host connection, for the relay
        self.sock: UdpSocket | None = None  # for host-arranged calls
        self.codecs: tuple[str, ...] = ()   # what we can encode and decode
        self._lock = threading.Lock()       # guards _direct
        self._direct: list[DirectCall] = []         # waiting for a hello
        self._hello_timer: asyncio.TimerHandle | None = None
        self._byes: list[PeerLink] = []     # direct links ended, still saying bye

    # --- the host connection (core's loop) ---

    def attach(self, link: Link, user: str) -> None:
        """Logged in as `user`: open the UDP socket for host-arranged calls
        and tell the host where it is and which codecs we have."""
        self.link, self.user = link, user
        self.media.user = user
        if self.sock is None:
            try:
                self.sock = UdpSocket(self.options.interface or "0.0.0.0",
                                      self.options.media_port, self._on_udp, "calls")
            except OSError as exc:          # calls still work, relayed by the host
                self.emit({"type": "error", "code": "bad_call_address",
                           "message": f"can't open UDP port {self.options.media_port} for "
                                      f"calls ({exc.strerror or exc}); they will go "
                                      "through the host"})
        self.to_host(MediaPort(self.sock.port if self.sock is not None else 0,
                               self._codecs()))

    def _codecs(self) -> tuple[str, ...]:
        """What we offer to encode and decode (looked up once)."""
        if not self.codecs:
            wanted = self.options.video_codec
            self.codecs = tuple(c for c in _media_codecs()
                                if wanted == "auto" or c == wanted or c not in VIDEO_CODECS)
        return self.codecs

    def connection_ended(self, reason: str) -> None:
        """The host connection is gone: its links end; direct calls go on."""
        self.link = None
        for link in self.media.links():
            if not link.direct:
                self._end(link, reason)

    def _relay(self, packet: bytes) -> None:
        """Send a media packet through the host (the engine calls it on the loop)."""
        if self.link is not None:
            self.link.offer_media(MediaData(packet))

    # --- commands (core's loop) ---

    def hang_up(self, user: str | None) -> bool:
        """End the link with `user` (a peer, or "ip:port" of a direct call),
        or every link. True if something here ended; the host is told by
        the caller."""
        ended = False
        for link in self.media.links():
            if link.connected and (user is None or id_key(user) in (
                    id_key(link.peer), _address_key(link))):
                self._end(link, "hangup", bye=True)
                ended = True
        for call in list(self._direct):
            if user is None or user == call.name:
                self._drop_direct(call, "cancelled")
                ended = True
        return ended

    def is_direct(self, user: str) -> bool:
        """Does `user` name a direct call (waiting or connected)?"""
        return any(call.name == user for call in self._direct) or any(
            link.direct and id_key(user) in (id_key(link.peer), _address_key(link))
            for link in self.media.links())

    def call_address(self, address: str, listen: int, port: int) -> None:
        """A direct call: listen on `listen`, say hello to address:`port`
        until they answer or the call timeout passes."""
        name = address_text(address, port)
        try:
            sock = UdpSocket(self.options.interface or ("::" if ":" in address else "0.0.0.0"),
                             listen, lambda data, source: None, "direct")
        except OSError as exc:
            self.emit({"type": "error", "code": "bad_call_address",
                       "message": f"can't listen on UDP port {listen}: "
                                  f"{exc.strerror or exc}"})
            return
        try:
            keys = KeyExchange()
        except MissingPackage as exc:
            sock.close()
            self.emit({"type": "error", "code": exc.code, "message": exc.message})
            return
        call = DirectCall(name, (address, port), sock, keys, time.monotonic())
        sock.on_packet = lambda data, source: self._on_direct(call, data)
        with self._lock:
            self._direct.append(call)
        self._say_hello()

    def peers(self) -> list[str]:
        return [link.peer for link in self.media.links()]

    @property
    def busy(self) -> bool:
        """Is there a link, or a direct call waiting? Then the clock must
        run (`tick`), whether the host connection is up or not."""
        return bool(self._direct) or bool(self.media.links())

    # --- events from the host (core's loop) ---

    def on_call_start(self, event: CallStart) -> None:
        try:
            link = PeerLink(event.peer, bytes.fromhex(event.link), bytes.fromhex(event.key),
                            event.side == "a", event.video, event.audio, self.sock,
                            (event.address, event.port) if event.port else None, False,
                            repair=self.options.video_repair)
        except (MissingPackage, ValueError) as exc:
            self.emit({"type": "error", "code": "missing_package",
                       "message": f"can't start the call: {exc}"})
            self.to_host(Hangup(event.peer, "hangup"))
            return
        if self.options.media_path == "relay" or link.address is None or self.sock is None:
            link.relay_out = True
            link.relay_asked = True
            self.to_host(RelayMedia(event.peer))
        self.media.add(link)
        self.emit({"type": "call_connected", "peer": link.peer,
                   "address": address_text(event.address, event.port),
                   "path": link.path, "codec": link.video or None,
                   "audio": link.audio or None, "safety_code": None})

    def on_call_ended(self, event: CallEnded) -> None:
        link = self.media.link(event.peer)
        if link is not None and not link.direct:
            self._end(link, event.reason)

    def on_relay_media(self, event: RelayMedia) -> None:
        link = self.media.link(event.user)
        if link is not None and not link.direct:
            link.relay_out = True

    def on_media_data(self, event: MediaData) -> None:
        self._on_packet(bytes(event.data), "relay")

    # --- the clock (core's loop, once per media_stats_s) ---

    def tick(self) -> None:
        """Liveness, the relay fallback, keepalives, and media_stats; the
        core calls it while `busy`, with or without a host connection."""
        limits, now = self.limits, time.monotonic()
        for call in list(self._direct):             # not connected yet
            if now - call.started > limits.call_timeout_s:
                self._drop_direct(call, "busy")
        for link in self.media.links():
            if not link.connected:          # a direct call's: see above
                continue
            if now - max(link.heard, link.started) > limits.media_silence_s:
                if not link.direct:
                    self.to_host(Hangup(link.peer, "lost"))
                self._end(link, "lost")
                continue
            if not link.direct and not link.relay_asked and self.options.media_path == "auto" \
                    and now - max(link.heard_udp, link.started) > limits.media_fallback_s:
                # No UDP from them: a firewall, most likely. Asked again next
                # tick if the host connection is down just now.
                link.relay_asked = self.to_host(RelayMedia(link.peer))
            if now - link.sent > limits.keepalive_s:
                self.media.send(link, KIND_CONTROL, pack_control(Control(CONTROL_KEEPALIVE)))
            self.emit(self.media.stats(link, now))

    # --- links ---

    def _end(self, link: PeerLink, reason: str, bye: bool = False) -> None:
        """Take a connected `link` out and tell the front end; with `bye`,
        a direct link's peer is told we hung up (`_say_bye`)."""
        if not self.media.forget(link):
            return
        if link.direct and link.sock is not None:
            if bye:
                link.sock.on_packet = lambda data, source: None    # theirs, until it lands
                self._byes.append(link)
                self._say_bye(link, _BYE_TIMES)
            else:
                link.sock.close()
        self.emit({"type": "call_ended", "peer": link.peer, "reason": reason})

    def _say_bye(self, link: PeerLink, times: int) -> None:
        """Send an ended direct link's bye, `times` times _BYE_EVERY_S apart
        (the loop is never held up), then close its socket. Only for direct
        links: the host tells the peer of one it arranged, and a bye on one
        is ignored (a second call_ended, or a reason other than the
        host's, would be wrong)."""
        if link not in self._byes:          # closed meanwhile
            return
        self.media.send(link, KIND_CONTROL, pack_control(Control(CONTROL_BYE)))
        if times > 1:
            self.loop.call_later(_BYE_EVERY_S, self._say_bye, link, times - 1)
            return
        self._byes.remove(link)
        if link.sock is not None:
            link.sock.close()

    def _on_udp(self, data: bytes, source: Any) -> None:
        self._on_packet(data, "udp")

    def _on_packet(self, data: bytes, via: str) -> None:
        """Any media packet (a socket's thread, or the loop if relayed)."""
        heard = self.media.on_packet(data, via)
        if heard is None or not heard.link.direct:      # the host says when one it
            return                                      # arranged ends: no bye there
        if heard.first:                     # they have our hello: connected
            call_soon(self.loop, self._direct_connected, heard.link)
        if heard.bye:                       # they hung up: at once, not after the silence
            call_soon(self.loop, self._end, heard.link, "hangup")

    # --- direct calls ---

    def _say_hello(self) -> None:
        """Repeat every waiting direct call's hello (and, once we know their
        key, a keepalive they can open) until it connects (core's loop).
        Called again for a new direct call, it restarts the one timer rather
        than start a second round of hellos beside it."""
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        self._hello_timer = None
        for call in list(self._direct):
            if call.link is None or not call.link.connected:
                hello = pack_hello(call.keys.public, {"user": self.user or "?",
                                                      "codecs": list(self._codecs())})
                call.sock.send(hello, call.address)
            if call.link is not None:
                self.media.send(call.link, KIND_CONTROL,
                                pack_control(Control(CONTROL_KEEPALIVE)))
        if self._direct:
            self._hello_timer = self.loop.call_later(_HELLO_EVERY_S, self._say_hello)

    def _on_direct(self, call: DirectCall, data: bytes) -> None:
        """A packet on a direct call's own socket (its receiving thread)."""
        header = peek_header(data)
        if header is None or header[0] != KIND_HELLO:
            self._on_packet(data, "udp")
            return
        hello = unpack_hello(data)
        if hello is None or call.link is not None:
            return                          # malformed, or a repeat of the hello we have
        public, info = hello
        try:
            agreed = call.keys.agree(public)
        except ValueError:
            self.media.garbage += 1
            return
        codecs = info.get("codecs")
        theirs = [c for c in codecs if isinstance(c, str)] if isinstance(codecs, list) else []
        mine = list(self._codecs())
        first, second = (mine, theirs) if agreed.i_am_a else (theirs, mine)
        video = next((c for c in first if c in second and c in VIDEO_CODECS), "")
        audio = next((c for c in first if c in second and c in AUDIO_CODECS), "")
        said = info.get("user")
        try:
            name = check_id(said if isinstance(said, str) else "", "user")
        except Refused:
            name = call.name
        if self.media.link(name) is not None:
            name = f"{name}@{call.name}"
        call.link = PeerLink(name, agreed.link_id, agreed.link_key, agreed.i_am_a, video,
                             audio, call.sock, call.address, True, agreed.safety_code,
                             repair=self.options.video_repair)
        self.media.add(call.link)

    def _direct_connected(self, link: PeerLink) -> None:
        """Their first packet came (queued from a receiving thread): the
        call is up, unless a /hangup or the timeout took it off the
        waiting list meanwhile, which said call_failed and forgot the link."""
        with self._lock:
            if not any(c.link is link for c in self._direct):
                return
            self._direct = [c for c in self._direct if c.link is not link]
        self.emit({"type": "call_connected", "peer": link.peer,
                   "address": _address_key(link), "path": "direct",
                   "codec": link.video or None, "audio": link.audio or None,
                   "safety_code": link.safety_code})

    def _drop_direct(self, call: DirectCall, reason: str | None) -> None:
        with self._lock:
            if call not in self._direct:
                return
            self._direct.remove(call)
        if call.link is not None:
            self.media.forget(call.link)
        call.sock.close()
        if reason is not None:
            self.emit({"type": "call_failed", "peer": call.name, "reason": reason})

    # --- the end ---

    async def farewell(self) -> None:
        """Stopping: tell every direct peer we hung up, as /hangup would
        (the byes only: no event follows `closed`). About 0.1 s with direct
        links, none without. Core's loop, before `close`."""
        links = [link for link in self.media.links() if link.direct and link.connected]
        for time_ in range(_BYE_TIMES if links else 0):
            if time_:
                await asyncio.sleep(_BYE_EVERY_S)
            for link in links:
                self.media.send(link, KIND_CONTROL, pack_control(Control(CONTROL_BYE)))

    def close(self) -> None:
        """Stop the engine and close every socket (any thread but the core's
        loop: it joins threads)."""
        links = self.media.links() + self._byes
        self._byes = []
        self.media.close()
        for link in links:
            if link.direct and link.sock is not None:
                link.sock.close(wait=True)
        for call in list(self._direct):
            call.sock.close(wait=True)
        self._direct.clear()
        if self.sock is not None:
            self.sock.close(wait=True)
            self.sock = None


def _media_codecs() -> tuple[str, ...]:
    """The codecs this machine has, best first, judged by which packages are
    installed, without importing them: importing PyAV and OpenCV takes a
    second or more, and the host must know before the first call starts.
    (A package that is there but broken is reported when first used.)"""
    def have(name: str) -> bool:
        return importlib.util.find_spec(name) is not None
    if not have("numpy"):
        return ()
    return tuple(name for name, ok in (("vp8", have("av")), ("jpeg", have("cv2")),
                                       ("opus", have("av")), ("pcm", True)) if ok)


def _address_key(link: PeerLink) -> str:
    """"ip:port" of a direct call's peer ("" for host-arranged links)."""
    return address_text(*link.address) if link.direct and link.address else ""


# =============================================================================
# 19. CLIENT PLACE: where a client is, across connections and crashes
# =============================================================================
# What the client core (next section) knows and keeps, apart from the
# loop that keeps it: the Place (the host's addresses, the room, the user,
# the resume token, the last seq, the lines not yet confirmed), the
# PlaceStore that keeps it on disk so a crashed client gets back, the
# words said while getting back, and how a host's frame becomes one of our
# events: closing reasons, names checked, the network doctor's hints.
# Nothing here opens a connection or starts a thread; PlaceStore's jobs
# run on the core's threads.

def reconnecting_line(event: dict) -> str:
    """What a person reads while the client tries to get back."""
    why = {"host_shutdown": "The host stopped"}.get(event.get("reason", ""),
                                                    "The connection to the host dropped")
    return (f"{why}; reconnecting (try {event['attempt']} in {event['retry_in']:g} s). "
            "What you type now is sent once back.")


def resumed_line(event: dict) -> str:
    missed, lost = event.get("missed", 0), event.get("lost", 0)
    return ("Back in the room" + (f"; {missed} room event{'s' if missed != 1 else ''} "
                                  "you missed follow" if missed else "")
            + (f" ({lost} more were too old to keep)" if lost else "") + ".")


# A connection that ended for one of these, after we were in the room: try
# to get back (the host may be back, or hold our seat).
_RETRY_AFTER = frozenset({"connection_lost", "host_shutdown", "login_timeout",
                          "protocol_error"})
MAX_UNCONFIRMED = 1000              # lines said and not yet confirmed, kept to resend


@dataclasses.dataclass
class Place:
    """Where a client is, kept across connections so it can get back: the
    host's addresses and port, the room and user, the resume token and the
    last room seq seen, and the lines said but not yet confirmed."""
    addresses: list[str]
    port: int
    room: str
    user: str
    found_on_lan: bool = False
    host_name: str = ""             # from the welcome: to find the host again by mDNS
    token: str = ""                 # the welcome's resume token
    seen: int = 0                   # the last room seq received
    seated: bool = False            # a welcome came: a drop now means getting back
    accept_key: str = ""            # a changed host key to accept: "*" any, or this one
    pending: dict[str, str] = dataclasses.field(default_factory=dict)  # id -> text
    # id -> recipient of each pending line that was private (a resend keeps it).
    pending_to: dict[str, str] = dataclasses.field(default_factory=dict)
    # The room's password, "" = none: sent again when the host forgot our seat.
    # In memory only: PlaceStore never writes it, and no repr shows it.
    password: str = dataclasses.field(default="", repr=False)


class PlaceStore:
    """What a client keeps on disk to get back to its Place after a crash
    (kill -9, a power cut): the resume token, the last seq received, the
    lines not yet confirmed and the downloads half done. One small JSON file
    per room, user and port in `folder` (--state-dir; None: nothing kept),
    readable by its owner only, rewritten when it changed (at most once a
    second, on a thread), and removed when the session ends (a crash never
    ends it). A record older than a day, for other addresses, or of a run
    still alive (a second login with the same ID must not take its seat) is
    ignored."""

    MAX_AGE_S = 86400.0

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._written = ""                  # what the file holds now

    def _path(self, place: Place) -> Path | None:
        if self.folder is None:
            return None
        key = f"{id_key(place.room)}\n{id_key(place.user)}\n{place.port}"
        return self.folder / "places" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"

    def load(self, place: Place) -> dict:
        """The record for `place`, or {} (missing, stale, corrupt, elsewhere)."""
        path = self._path(place)
        try:
            if path is None or time.time() - path.stat().st_mtime > self.MAX_AGE_S:
                return {}
            record = json.loads(path.read_text(encoding="utf-8"))
            if type(record) is not dict or not set(record.get("addresses", ())) & \
                    set(place.addresses) or type(record.get("token")) is not str:
                return {}
            pid = record.get("pid")
            if type(pid) is not int or _process_alive(pid):
                return {}                   # that run is alive: its place, not ours
            self._written = json.dumps(record, ensure_ascii=False, sort_keys=True)
            return record
        except (OSError, ValueError):
            return {}

    def save(self, place: Place, downloads: list[dict]) -> Callable[[], None] | None:
        """A job that writes `place` (for a thread), or None if unchanged."""
        path = self._path(place)
        if path is None or not place.token:
            return None
        text = json.dumps({"pid": os.getpid(), "addresses": place.addresses,
                           "token": place.token,
                           "seen": place.seen, "pending": place.pending,
                           "pending_to": place.pending_to,
                           "downloads": downloads}, ensure_ascii=False, sort_keys=True)
        if text == self._written:
            return None
        self._written = text

        return lambda: write_private(path, text.encode("utf-8"))

    def remove(self, place: Place) -> Callable[[], None] | None:
        path = self._path(place)
        self._written = ""
        return None if path is None else lambda: path.unlink(missing_ok=True)


def restore_place(place: Place, record: dict) -> list[dict]:
    """Take a PlaceStore record into `place`; returns its downloads. Every
    field is checked: the file is ours, but a disk can hold anything."""
    place.token = record["token"][:64]
    seen = record.get("seen")
    place.seen = seen if type(seen) is int and seen >= 0 else 0
    pending = record.get("pending")
    if type(pending) is dict:
        place.pending = {k: v for k, v in pending.items()
                         if type(k) is str and type(v) is str}
    pending_to = record.get("pending_to")
    if type(pending_to) is dict:
        place.pending_to = {k: v for k, v in pending_to.items()
                            if k in place.pending and type(v) is str}
    downloads = record.get("downloads")
    return [d for d in downloads if type(d) is dict and type(d.get("transfer")) is int
            and type(d.get("part")) is str and type(d.get("size")) is int] \
        if type(downloads) is list else []


CLOSED_REASONS = {
    "quit": "You left the room.",
    "host_shutdown": "The host is shutting down.",
    "connection_lost": "The connection to the host was lost.",
    "refused": "The host refused the login.",
    "unreachable": "The host could not be reached.",
    "login_timeout": "The host did not answer the login in time.",
    "protocol_error": "The host sent something this client does not understand.",
    "flooding": "The host disconnected you for sending too many messages too fast.",
}


# "A host's closing{reason} is `bye` (answering ours), `host_shutdown` or `flooding`;
# any other reason reads as protocol_error", so a rogue host can neither
# put its own words on the screen nor pose as one of our own reasons.
_HOST_CLOSING = {"bye": "quit", "host_shutdown": "host_shutdown", "flooding": "flooding"}


def closing_reason(reason: str) -> str:
    """The `closed` reason for a host's closing{reason}."""
    return _HOST_CLOSING.get(reason, "protocol_error")


# "The client checks every name a host sends": the fields that hold a User
# ID (a Room ID for `room`), by event. An event with a bad one is dropped,
# with a warning; a bad name in a welcome or resumed (our own seat) ends the
# connection as protocol_error. A name may be "" where the protocol says so.
_ID_FIELDS = ("sender", "user", "peer", "to", "recipient", "room")


def bad_names(event: Event) -> str:
    """What is wrong with the names in a host's `event` ("" if nothing)."""
    for field in dataclasses.fields(event):
        value = getattr(event, field.name)
        names: tuple = ()
        if field.name in _ID_FIELDS and value:
            names = ((value, "room" if field.name == "room" else "user"),)
        elif field.name == "members":
            names = tuple((member, "user") for member in value)
        elif field.name == "downloads":             # [transfer, from, name, size, to]
            names = tuple((row[i], "user") for row in value for i in (1, 4) if row[i])
        for name, kind in names:
            problem = _name_problem(name, kind)
            if problem:
                wire_name = WIRE_NAMES.get(field.name, field.name)
                return f"{event.TYPE}.{wire_name} {printable(name)!r}: {problem}"
    return ""


@functools.lru_cache(maxsize=1024)          # a room's few names, on every message
def _name_problem(name: str, kind: str) -> str:
    try:
        check_id(name, kind)
    except Refused as refusal:
        return refusal.message
    return "reserved for system notices" if kind == "user" and imitates_system(name) else ""


def ui_event(event: Event) -> dict:
    """The vocabulary dict for an event received from the host."""
    out = event.to_wire()
    if isinstance(event, Welcome):
        out["type"] = "ready"
        del out["version"], out["resume"]   # the token is the core's secret
    elif isinstance(event, Resumed):        # files carrying on: their own events
        del out["uploads"], out["downloads"]
        out["files"] = len(event.uploads) + len(event.downloads)
    elif isinstance(event, Message):
        out["to"] = event.to or None        # "message{to}": null for the room
    elif isinstance(event, Error):
        if event.id == "-":
            del out["id"]
        if not event.retry_after:
            del out["retry_after"]
    return out


# =============================================================================
# 20. CLIENT CORE: one asyncio loop in a thread, one event stream
# =============================================================================
# What every front end shares: the terminal client and the window
# call the thread-safe methods of ClientCore and receive plain dict events
# through one callback. Those dicts are the program's event vocabulary; the
# terminal's --json mode prints exactly them, one per line:
#
#   ready{room,user,members,host,address,port}   message{from,text,ts,history,seq,id}
#   system{event,user,text,ts,seq}   help{text}   members{members}
#   error{code,message[,id]}   closed{reason}   host{name,address,port,rooms,...}
#
# The host's frames already carry most of these names (WIRE PROTOCOL), so
# an event is the host's frame, checked, with `welcome` renamed `ready`.
# `closed` is emitted exactly once per join attempt, last; its reason is one
# of CLOSED_REASONS. The callback runs on the core's thread and must not
# block: the window forwards it with write_event_value, the terminal prints.

# --- The core ----------------------------------------------------------------

class ClientCore:
    """One chat connection, driven from any thread.

    `start()` runs an asyncio loop in a daemon thread. Every command returns
    a concurrent.futures.Future at once; its result is for whoever cares,
    since the outcome also arrives as events. `on_event(dict)` is called on
    the core's thread for every event. Files go through `files`
    (ClientFiles, 10), which the core feeds; the LAN watch and a host run
    in this process are the window's, and stop with the core.
    """

    def __init__(self, on_event: Callable[[dict], None], limits: Limits = Limits(),
                 downloads: Path | None = None, media: MediaOptions = MediaOptions(),
                 state_dir: Path | None = None, known_hosts: KnownHosts | None = None,
                 host_key_dir: Path | None = None) -> None:
        self.on_event = on_event
        self.limits = limits
        self.known_hosts = known_hosts      # None: plain TCP (--insecure)
        self.host_key_dir = host_key_dir    # where a host run here keeps its key
        self.loop = asyncio.new_event_loop()    # runs in our thread once started
        self._thread: threading.Thread | None = None
        self._link: Link | None = None      # the connection, while there is one
        self._reader: asyncio.Task | None = None
        self._ready = False                 # logged in
        self._id_prefix = secrets.token_hex(4)
        self._next_id = 0
        self.interface: str | None = None   # where to look for the host again (--interface)
        self._place: Place | None = None    # the room we are in, across connections
        self._store = PlaceStore(state_dir)     # and on disk, to get back after a crash
        # Our place and the pinned keys are written by one thread, in the
        # order they changed: two writers at once would race, and the
        # older state could land last.
        self._disk = concurrent.futures.ThreadPoolExecutor(1, "place-disk")
        self._retrying: asyncio.Task | None = None  # getting back after a drop
        self._leaving = False               # leave() began: a drop now is no drop
        self._pacing = asyncio.Lock()       # chat lines go one by one, in order,
        self._gate: FloodGate | None = None     # at the host's pace (from the welcome)
        self._attempt_end = ""              # why the last attempt's connection ended
        self._browser: HostBrowser | None = None  # while watching the LAN
        self._silent: dict[str, int] = {}   # listed hosts' unanswered dials, by key
        self._checker: asyncio.Task | None = None
        self._host: Host | None = None      # a host run in this process
        self.files = ClientFiles(limits, Path(os.path.abspath(os.path.expanduser(
            downloads or default_downloads_dir()))), self._emit)
        self.calls = ClientCalls(limits, media, self._emit, self._to_host, self.loop)
        self._call_ticker: asyncio.TimerHandle | None = None    # the calls' clock
        self._closing = False               # stop() began: the clock stays stopped
        # Call events from the host that ClientCalls acts on; the rest of
        # them (call_invite, call_missed, call_failed) go out as they came.
        self._call_handlers: dict[type[Event], Callable[[Any], Any]] = {
            CallStart: self.calls.on_call_start, CallEnded: self.calls.on_call_ended,
            RelayMedia: self.calls.on_relay_media, MediaData: self.calls.on_media_data,
        }

    @property
    def downloads(self) -> Path:
        """Where received files go."""
        return self.files.downloads

    # --- thread plumbing ---

    def start(self) -> None:
        started = threading.Event()
        self._thread = threading.Thread(target=self._run_loop, args=(started,),
                                        name="chatroom-core", daemon=True)
        self._thread.start()
        started.wait()

    def _run_loop(self, started: threading.Event) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        loop.call_soon(started.set)
        try:
            loop.run_forever()
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    def submit(self, coro: Any) -> concurrent.futures.Future:
        """Run a coroutine on the core's loop; returns a concurrent Future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, timeout: float | None = None) -> None:
        """Leave (if in a room), stop the loop and join the thread. Blocks for
        at most about `timeout` seconds (default: a little over the close
        timeout); call it from any thread but the core's."""
        if self._thread is None:
            if not self.loop.is_closed() and not self.loop.is_running():
                self.loop.close()           # never started
            self.files.close()
            self.calls.close()
            self._disk.shutdown()
            return
        timeout = self.limits.close_timeout_s + 1 if timeout is None else timeout
        try:
            self.submit(self._shutdown()).result(timeout)
        except concurrent.futures.TimeoutError:
            log.warning("the core did not shut down within %.1f s; stopping anyway", timeout)
        except Exception:                   # a bug: say so, but stop all the same
            log.exception("shutting the core down failed")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        self._thread = None
        self.files.close()
        self.calls.close()
        self._disk.shutdown()               # the last write (or removal) is done

    def _emit(self, event: dict | None) -> None:
        """Hand one event to the front end (None, from a paced source: nothing)."""
        if event is None:
            return
        try:
            self.on_event(event)
        except Exception:
            log.exception("event handler failed on %r", event.get("type"))

    def _error(self, code: str, message: str) -> None:
        self._emit({"type": "error", "code": code, "message": message})

    # --- commands (any thread) ---

    def join(self, hosts: str | Sequence[str], port: int, room: str, user: str,
             found_on_lan: bool = False, password: str = "", host_name: str = "",
             accept_key: str = "") -> concurrent.futures.Future:
        """Connect and log in. `hosts`: an address or a name, or every
        address a host advertised, best first (the first that connects
        wins: connect_first); `found_on_lan`: mDNS found it (a failure is
        then most likely a firewall, and the error says so); `password`:
        the room's, or the one a room opened now gets ("" = none);
        `host_name`: the name it was found by (its key is pinned under that
        name); `accept_key`: a changed host key to accept ("*": any).
        Future -> True once `ready`, else False."""
        return self.submit(self._join(hosts, port, room, user, found_on_lan, password,
                                      host_name, accept_key))

    def say(self, text: str, to: str = "") -> concurrent.futures.Future:
        """Send a chat line to the room, or with `to` to that member alone
        (a private line). Future -> the message id, or None if refused."""
        return self.submit(self._say(text, to))

    def who(self) -> concurrent.futures.Future:
        return self.submit(self._send(Who()))

    def watch_hosts(self, interface: str | None = None) -> concurrent.futures.Future:
        """Browse the LAN until the core stops: a `hosts{hosts}` event (a
        list of `host` events) now and whenever a host or its rooms change.
        Future -> True, or False (with an `error`) if discovery can't run."""
        return self.submit(self._watch_hosts(interface))

    def start_host(self, *, port: int = DEFAULT_PORT, name: str | None = None,
                   interface: str | None = None, advertise: bool = True,
                   limits: Limits | None = None) -> concurrent.futures.Future:
        """Run a room host in this process (the window's "Host a room here").
        Emits `listening{address,port,name,advertised}`, or an `error`.
        Future -> the port, or None. `stop()` shuts the host down too."""
        return self.submit(self._start_host(port, name, interface, advertise,
                                            limits or self.limits))

    def send_file(self, path: str | Path, to: str | None = None) -> concurrent.futures.Future:
        """Send a file to everyone else in the room, or to user `to` alone.
        Future -> the transfer number, or None if it was refused at once."""
        return self.submit(self.files.send(Path(path), to or ""))

    def accept_file(self, transfer: int) -> concurrent.futures.Future:
        """/accept: take file `transfer`, which waits for an answer (its
        file_offer said `ask`). Future -> True, or False after an `error`."""
        return self.submit(self._run(self.files.accept, transfer))

    def decline_file(self, transfer: int) -> concurrent.futures.Future:
        """/decline: refuse file `transfer`, which waits for an answer.
        Future -> True, or False after an `error`."""
        return self.submit(self._run(self.files.decline, transfer))

    def cancel_file(self, transfer: int,
                    direction: str | None = None) -> concurrent.futures.Future:
        """/cancel: stop file `transfer` (`direction` "send" or "receive"
        when both kinds have that number). Future -> True, or False after
        an `error`."""
        return self.submit(self._run(self.files.cancel, transfer, direction))

    def waiting_file(self, transfer: int) -> bool:
        """Does download `transfer` wait for an answer? (Any thread: a glance.)"""
        dl = self.files.downloads_by_number.get(transfer)
        return dl is not None and dl.state is ReceiveState.WAITING

    def call(self, user: str) -> concurrent.futures.Future:
        """/CHECK `user`: invite them, or answer their invitation.
        Future -> True if the host got it (what follows arrives as events)."""
        return self.submit(self._send(Call(user)))

    def decline(self, user: str) -> concurrent.futures.Future:
        return self.submit(self._send(Decline(user)))

    def call_address(self, address: str, listen: int, port: int) -> concurrent.futures.Future:
        """A direct call: receive on UDP `listen`, send to `address`:`port`."""
        return self.submit(self._run(self._call_address, address, listen, port))

    def hang_up(self, user: str | None = None) -> concurrent.futures.Future:
        """End the call with `user`, or every call (and withdraw invitations)."""
        return self.submit(self._hang_up(user))

    def set_media(self, *, muted: bool | None = None,
                  video: bool | None = None) -> concurrent.futures.Future:
        """/mute, /unmute, /video off, /video on: emits `media_state`."""
        return self.submit(self._set_media(muted, video))

    def set_ask_above(self, size: int) -> concurrent.futures.Future:
        """Files offered from now on that are larger than `size` wait for
        /accept or /decline (0: every file). It takes effect on a
        connection whose hello asked the host to hold files (--ask-above,
        or the window, which always does)."""
        return self.submit(self._run(setattr, self.files, "ask_above", size))

    def leave(self, wait_for_uploads: bool = False) -> concurrent.futures.Future:
        """Leave the room, first letting our uploads reach the host if
        `wait_for_uploads`. Future -> None once `closed` has been emitted."""
        return self.submit(self._leave(wait_for_uploads))

    @property
    def connected(self) -> bool:
        """In a room (logged in, not yet left)."""
        return self._ready

    @property
    def hosting_others(self) -> int:
        """People on the host this process runs, besides us (any thread: a
        glance at a set's size)."""
        host = self._host
        return max(0, len(host.sessions) - (1 if self._ready else 0)) if host else 0

    # --- the LAN and an in-process host (core thread) ---

    async def _watch_hosts(self, interface: str | None) -> bool:
        if self._browser is not None:
            return True
        browser = HostBrowser(interface, on_change=self._hosts_changed,
                              resolve_timeout_s=self.limits.resolve_timeout_s)
        try:
            await browser.start()
        except (MissingPackage, OSError) as exc:
            await browser.close()
            self._error("missing_package" if isinstance(exc, MissingPackage)
                        else "no_host", f"can't look for hosts: {_why(exc)}")
            return False
        self._browser = browser
        self._hosts_changed([])
        self._checker = asyncio.get_running_loop().create_task(
            self._check_hosts(browser), name="host-checks")
        log_failure(self._checker, "checking listed hosts")
        return True

    def _hosts_changed(self, hosts: list[HostInfo]) -> None:
        """A `hosts` event: every host listed, `alive` false for one that
        stopped answering (see _check_hosts)."""
        gone = self._gone()
        self._emit({"type": "hosts", "hosts": [
            {**h.to_event(), "alive": h.key not in gone} for h in hosts]})

    async def _check_hosts(self, browser: HostBrowser) -> None:
        """While watching: dial every listed host now and then. An mDNS
        record outlives a host killed without warning by minutes (its
        records live 120 s and more); a host that doesn't take a TCP
        connection `host_check_misses` times in a row is listed as not
        answering until it does again, or its record goes."""
        limits = self.limits
        loop = asyncio.get_running_loop()

        async def answers(host: HostInfo) -> bool:
            try:
                _address, (transport, _protocol) = await connect_first(
                    host.addresses or (host.address,),
                    lambda a: loop.create_connection(asyncio.Protocol, a, host.port),
                    min(limits.connect_timeout_s, limits.host_check_s))
            except (OSError, TimeoutError):
                return False
            transport.close()               # the host sees a visitor who left: fine
            return True

        while self._browser is browser:
            await asyncio.sleep(limits.host_check_s)
            hosts = browser.sorted_hosts()
            alive = await asyncio.gather(*(answers(h) for h in hosts))
            gone_before = self._gone()
            self._silent = {h.key: self._silent.get(h.key, 0) + 1
                            for h, ok in zip(hosts, alive) if not ok}
            if self._browser is browser and self._gone() != gone_before:
                self._hosts_changed(browser.sorted_hosts())

    def _gone(self) -> set[str]:
        return {key for key, misses in self._silent.items()
                if misses >= self.limits.host_check_misses}

    async def _start_host(self, port: int, name: str | None, interface: str | None,
                          advertise: bool, limits: Limits) -> int | None:
        if self._host is not None:
            return self._host.port
        key = None
        if self.known_hosts is None:
            self._warn_insecure("for the room hosted here")
        else:
            folder = self.host_key_dir or config_dir()
            try:
                key = await self.loop.run_in_executor(None, HostKey.load_or_create, folder,
                                                      name or socket.gethostname())
            except (OSError, ValueError, MissingPackage) as exc:
                self._error("file_io", f"can't keep the host's TLS key in {folder}: "
                            f"{_why(exc)}")
                return None
        host = Host(bind=interface or "0.0.0.0", port=port, name=name,
                    advertise=advertise, interface=interface, limits=limits, tls=key)
        try:
            await host.start()
        except (OSError, MissingPackage) as exc:
            await host.close()
            self._error(*listen_error(exc, port))
            return None
        self._host = host
        self._emit({"type": "listening", "address": host.bind, "port": host.port,
                    "name": host.name, "advertised": host.advertiser is not None,
                    "fingerprint": host.fingerprint, "encrypted": host.tls is not None})
        return host.port

    async def _shutdown(self) -> None:
        """Everything `stop()` ends: the room, the calls (their clock, and a
        bye to each direct peer), the LAN watch, the host."""
        await self._leave()
        self._closing = True
        if self._call_ticker is not None:
            self._call_ticker.cancel()
            self._call_ticker = None
        await self.calls.farewell()
        browser, self._browser = self._browser, None
        if self._checker is not None:
            self._checker.cancel()
            self._checker = None
        if browser is not None:
            await browser.close()
        host, self._host = self._host, None
        if host is not None:
            await host.close()

    # --- the connection (core thread) ---

    async def _join(self, hosts: str | Sequence[str], port: int, room: str, user: str,
                    found_on_lan: bool = False, password: str = "", host_name: str = "",
                    accept_key: str = "") -> bool:
        if self._link is not None or self._place is not None:
            self._error("bad_frame", "already connected; leave first")
            return False
        try:                                # the host would refuse them: say so now
            room, user = check_id(room, "room"), check_id(user, "user")
        except Refused as exc:
            self._error(exc.code, exc.message)
            self._emit({"type": "closed", "reason": "refused"})
            return False
        addresses = [hosts] if isinstance(hosts, str) else list(hosts)
        self._leaving = False
        self._place = Place(addresses, port, room, user, found_on_lan, host_name,
                            password=password, accept_key=accept_key)
        if self.known_hosts is None:        # said each time: nobody forgets it's on
            self._warn_insecure("to the host")
        record = await self.loop.run_in_executor(None, self._store.load, self._place)
        if record:                          # a run of ours crashed here: get back
            for entry in restore_place(self._place, record):
                self.files.orphans[entry["transfer"]] = entry
        if await self._connect(self._place):
            return True
        self._place = None
        self.files.orphans.clear()
        return False

    async def _connect(self, place: Place) -> bool:
        """One connection and login to where `place` says, as a resume if
        it holds a token. True once `ready` or `resumed`. The first time,
        a failure is said (`error`, `closed`); when getting back after a
        drop, `_reconnect` decides what a failure means."""
        limits = self.limits
        loop = asyncio.get_running_loop()
        first = not place.seated
        addresses, port = place.addresses, place.port
        tls = client_context() if self.known_hosts is not None else None
        try:
            if len(addresses) == 1 and not is_ip(addresses[0]):    # a name: its addresses
                infos = await loop.getaddrinfo(addresses[0], port, type=socket.SOCK_STREAM)
                addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
            host, (transport, protocol) = await connect_first(
                addresses, lambda address: loop.create_connection(
                    LinkProtocol, address, port, ssl=tls,
                    ssl_handshake_timeout=limits.connect_timeout_s if tls else None),
                limits.connect_timeout_s)
        except ssl.SSLError as exc:         # it answered, but not in TLS 1.3
            self._attempt_end = "refused"
            self._error("tls_mismatch", f"{address_text(addresses[0], port)} does not speak "
                        f"TLS 1.3 ({exc.reason or exc}): most likely it runs with --insecure. "
                        "Connect with --insecure too only if you accept that anyone on "
                        "the network can read the chat")
            if first:
                self._emit({"type": "closed", "reason": "refused"})
            return False
        except (OSError, TimeoutError) as exc:
            self._attempt_end = "unreachable"
            if first:
                where = address_text(addresses[0], port) + (
                    f" (or {', '.join(addresses[1:])})" if len(addresses) > 1 else "")
                self._error("host_unreachable", f"can't reach {where}: "
                            f"{why_unreachable(exc, limits.connect_timeout_s)}"
                            + (firewall_hint(port) if place.found_on_lan else ""))
                self._emit({"type": "closed", "reason": "unreachable"})
            return False
        link = Link(Wire(Role.CLIENT, limits.max_frame_bytes), transport, limits,
                    f"{host}:{port}")
        # Not a word to the host before its key is checked: the hello
        # carries our resume token, and what follows, the chat.
        if tls is not None and not self._key_trusted(
                [name_label(place.host_name)] if place.host_name
                else [address_text(place.addresses[0], place.port)], link.peer_key):
            link.abort("refused")
            self._attempt_end = "refused"
            if first:
                self._emit({"type": "closed", "reason": "refused"})
            return False
        try:
            link.offer(Hello(PROTOCOL_VERSION, place.room, place.user,
                             f"chatroom/{__version__}", place.token, place.seen,
                             place.password, self.files.ask_above is not None))
        except LocalError:                  # undecodable text, e.g. from argv
            link.abort("refused")
            self._error("bad_user_id", "the Room ID, User ID and password must be valid text")
            self._emit({"type": "closed", "reason": "refused"})
            return False
        protocol.attach(link)               # after the hello: a host may answer at once
        self._link = link
        joined = loop.create_future()
        self._reader = loop.create_task(self._read_loop(link, joined, host, port),
                                        name=f"reader:{host}:{port}")
        log_failure(self._reader, f"reading from {host}:{port}")
        return await joined

    def _key_trusted(self, labels: list[str], fingerprint: str) -> bool:
        """Is the host's key the one we know it by (KnownHosts.verify)?
        Says why not; pins a new one and saves the pins on a thread."""
        known, place = self.known_hosts, self._place
        if known is None or place is None:
            return True
        trusted, events = known.verify(labels, fingerprint, place.accept_key)
        for event in events:
            self._emit(event)
        if known.dirty:
            self._on_disk(known.save)
        return trusted

    def _warn_insecure(self, where: str) -> None:
        """--insecure: say so, every time, on stderr and as an event."""
        message = (f"--insecure: plain TCP {where}. Anyone on this network can read the "
                   "chat, the files and their names, and pretend to be the host")
        log.warning("%s", message)
        self._emit({"type": "warning", "code": "insecure", "message": message})

    async def _read_loop(self, link: Link, joined: asyncio.Future,
                         host: str, port: int) -> None:
        """Every event from the host, until the connection ends; then, if
        we were in the room and the host went away, getting back
        (`_reconnect`), else `closed`."""
        reason = "connection_lost"
        try:
            while True:
                wait = (self.limits.peer_silence_s if self._ready
                        else self.limits.hello_timeout_s)
                try:
                    events = await asyncio.wait_for(link.receive(), wait)
                except TimeoutError:
                    reason = "connection_lost" if self._ready else "login_timeout"
                    break
                except RemoteError as exc:
                    if link.at_eof:         # cut off inside a frame: just lost
                        break
                    self._error(exc.code, f"the host broke the protocol: {exc.message}")
                    reason = "protocol_error"
                    break
                if events is None:
                    if not self._ready and not link.heard_anything \
                            and self.known_hosts is None:   # a TLS host hangs up on us
                        self._error("tls_mismatch", "the host hung up without a word: most "
                                    "likely it encrypts (runs without --insecure); drop "
                                    "--insecure")
                        reason = "refused"
                    break
                ended = False
                for event in events:
                    outcome = self._on_host_event(link, event, joined, host, port)
                    if isinstance(outcome, str):
                        reason, ended = outcome, True   # the host's last word
                        break
                    if outcome is not None:
                        await outcome       # our disk is behind: stop reading
                # Not `link.wire.state`: it moves as frames are decoded, so it
                # can say CLOSED before the closing event has been handled here.
                if ended:
                    break
        finally:
            self._ready = False
            self._link = None
            self.files.connection_lost()
            if reason in ("connection_lost", "login_timeout", "protocol_error"):
                link.abort(reason)          # nothing more to say to this host
            await link.finish()
            if not joined.done():
                joined.set_result(False)
            self._connection_ended(reason)

    def _connection_ended(self, reason: str) -> None:
        """After a connection: try to get back, let `_reconnect` judge an
        attempt, or end the session (`closed`, once)."""
        place = self._place
        if self._leaving:                   # a leave (say, a second one: end of input,
            reason = "quit"                 # then SIGTERM) aborted it: no getting back
        self._attempt_end = reason
        if place is None or self._retrying is not None:
            return                          # over already, or _reconnect's attempt
        if place is not None and place.seated and reason in _RETRY_AFTER \
                and self.limits.retry_for_s > 0:
            self._retrying = asyncio.get_running_loop().create_task(
                self._reconnect(reason), name="reconnect")
            log_failure(self._retrying, "getting back to the host")
            return
        self._session_over(reason)

    def _session_over(self, reason: str) -> None:
        """The room is left for good: calls end, `closed` is said."""
        if self._place is not None:
            self._on_disk(self._store.remove(self._place))
        self._place = None
        self.files.give_up()
        self.calls.connection_ended("left" if reason == "quit" else "lost")
        self._emit({"type": "closed", "reason": reason})

    async def _reconnect(self, reason: str) -> None:
        """Get back after a drop: retry with backoff and jitter for
        `retry_for_s`, finding the host again by mDNS (by its name) if its
        address changed; each try says `reconnecting`. Ends with
        `resumed` (or a fresh `ready` if the host forgot us: restarted, or
        the grace period passed), or `closed` when it gives up or the host
        refuses us."""
        loop = asyncio.get_running_loop()
        place = self._place
        assert place is not None
        started = loop.time()
        try:
            for attempt in itertools.count(1):
                delay = random.uniform(*RECONNECT_JITTER) * min(
                    self.limits.reconnect_max_s,
                    self.limits.reconnect_first_s * 2 ** (attempt - 1))
                if loop.time() + delay - started > self.limits.retry_for_s:
                    break
                self._emit({"type": "reconnecting", "attempt": attempt,
                            "retry_in": round(delay, 1), "reason": reason})
                await asyncio.sleep(delay)
                if attempt > 1 and place.host_name:
                    await self._find_again(place)
                if await self._connect(place) and self._link is not None:
                    return                  # back (and not lost again at once)
                if self._attempt_end == "refused":  # user_taken and such: said already
                    reason = "refused"
                    break
                if self._attempt_end == "host_shutdown":
                    reason = "host_shutdown"
        finally:
            self._retrying = None
        if self._place is place:
            self._session_over(reason)

    async def _find_again(self, place: Place) -> None:
        """Look for the host by name on the LAN; a new address or port, if
        it moved, is where the next try goes."""
        try:
            found = await discover(self.limits.rediscover_s, interface=self.interface,
                                   name=place.host_name,
                                   settle=self.limits.discovery_settle_s)
        except (MissingPackage, OSError):
            return
        if found:
            place.addresses = list(found[0].addresses or (found[0].address,))
            place.port = found[0].port

    def _on_host_event(self, link: Link, event: Event, joined: asyncio.Future,
                       host: str, port: int) -> Any:
        """Handle one event. Returns a closing reason (str) when it ends the
        session, an awaitable when reading must pause until it is done, or
        None."""
        wrong = bad_names(event)
        if wrong:
            log.warning("the host sent a bad name, %s", wrong)
            return "protocol_error" if isinstance(event, (Welcome, Resumed)) else None
        file_handler = self.files.handlers.get(type(event))
        if file_handler is not None:
            return file_handler(event)
        call_handler = self._call_handlers.get(type(event))
        if call_handler is not None:
            return call_handler(event)
        if isinstance(event, Ping):
            link.offer(Pong(event.n))
            return None
        if isinstance(event, Pong):
            return None
        if isinstance(event, Closing):
            return closing_reason(event.reason)
        if isinstance(event, Welcome) and link.peer_key and \
                not self._key_trusted([name_label(event.host)], link.peer_key):
            return "refused"                # another key is known by the name it gave
        place = self._place
        if isinstance(event, (Message, System)) and place is not None:
            if isinstance(event, Message) and id_key(event.sender) == id_key(place.user):
                place.pending.pop(event.id, None)   # confirmed
                place.pending_to.pop(event.id, None)
            history = isinstance(event, Message) and event.history
            if not history and event.seq <= place.seen:
                return None                 # seen before a drop, or a re-confirmation
            place.seen = max(place.seen, event.seq)
        if isinstance(event, Error) and place is not None and event.id:
            place.pending.pop(event.id, None)   # refused: not to be sent again
            place.pending_to.pop(event.id, None)
        out = ui_event(event)
        if isinstance(event, (Welcome, Resumed)):
            self._seated(link, event, out, host, port)
        self._emit(out)
        if isinstance(event, (Welcome, Resumed)):
            joined.set_result(True)
            if isinstance(event, Resumed):
                self.files.resumed(event)
            self.files.orphans.clear()      # left unclaimed: stale now
            self._resend()
        elif isinstance(event, Error) and not joined.done():
            return "refused"                # an error before the welcome: no login
        return None

    def _seated(self, link: Link, event: Welcome | Resumed, out: dict, host: str,
                port: int) -> None:
        """A login answered: in the room (again)."""
        place = self._place
        if place is not None:
            if isinstance(event, Welcome):
                if place.seated:            # the host forgot us: a new seat; calls it
                    self.calls.connection_ended("lost")     # arranged and files gone
                    self.files.give_up("the host was restarted, or forgot us")
                place.seen, place.token = 0, event.resume
            place.seated, place.host_name = True, event.host
            place.user, place.accept_key = event.user, ""   # accepted once, no more
        self._ready = True
        # Our own gate, a little under the host's, so that no line is refused
        # for its rate however fast it is typed, pasted or piped in. Kept
        # across a resume: what it counted is at least what the host saw.
        rate, burst = event.rate * OWN_RATE_SHARE, max(1, event.burst - OWN_BURST_MARGIN)
        if event.rate <= 0 or event.burst <= 0:
            self._gate = None
        elif self._gate is None or (self._gate.rate_per_s, self._gate.burst) != (rate, burst):
            self._gate = FloodGate(rate, burst, 0)
        self.files.attach(link, event.max_file_size, event.user)
        self.calls.attach(link, event.user)
        if self._call_ticker is not None:
            self._call_ticker.cancel()
        self._tick_calls()
        out.update(address=host, port=port,
                   protected=place is not None and bool(place.password),  # else refused
                   fingerprint=link.peer_key, encrypted=bool(link.peer_key))

    def _resend(self) -> None:
        """What was said but never confirmed goes again, in order, with its
        id: a host that has it confirms it again, never doubles it."""
        place = self._place
        if place is None or not place.pending:
            return
        task = self.loop.create_task(self._resend_paced(list(place.pending.items())),
                                     name="resend")
        log_failure(task, "sending again what was not confirmed")

    async def _resend_paced(self, lines: list[tuple[str, str]]) -> None:
        async with self._pacing:            # before any line typed after this
            for msg_id, text in lines:
                await self._keep_pace()
                place, link = self._place, self._link
                if place is None or link is None or not link.accepting:
                    return
                if msg_id in place.pending:
                    link.offer(Say(msg_id, text, place.pending_to.get(msg_id, "")))

    def _to_host(self, event: Event) -> bool:
        """Queue `event` for the host now, if we are in a room (core thread)."""
        link = self._link
        return link is not None and self._ready and link.offer(event)

    async def _run(self, function: Callable, *args: Any) -> Any:
        """Call `function` on the core's loop (for the thread-safe API)."""
        return function(*args)

    async def _hang_up(self, user: str | None) -> bool:
        direct = user is not None and self.calls.is_direct(user)
        ended = self.calls.hang_up(user)
        if direct:
            return True
        if self._ready:                     # the host ends its links and invitations
            return await self._send(Hangup(user or "", "hangup"))
        if not ended:
            self._error("not_in_call", "you are not in a call")
        return ended

    async def _set_media(self, muted: bool | None, video: bool | None) -> None:
        if muted is not None:
            self.calls.media.set_muted(muted)
        if video is not None:
            self.calls.media.set_camera(video)
        self._emit({"type": "media_state", "muted": self.calls.media.muted,
                    "video": self.calls.media.camera_on})

    def _call_address(self, address: str, listen: int, port: int) -> None:
        self.calls.call_address(address, listen, port)
        self._keep_ticking()                # logged in or not: direct calls need no host

    def _tick_calls(self) -> None:
        """Once per media_stats_s while logged in, or while there is a call
        (a link, or a direct call waiting), whatever the host connection
        does: direct calls need no host, and host-arranged ones go on
        through a drop. The calls' clock (liveness, keepalives, the direct
        call timeout, media_stats), and the place on disk brought up to
        date. Stops when neither holds; `_keep_ticking` starts it again."""
        self._call_ticker = None
        self.calls.tick()
        if self._place is not None:
            self._on_disk(self._store.save(self._place, self.files.in_progress()))
        self._keep_ticking()

    def _keep_ticking(self) -> None:
        """Schedule the next tick, unless one is due or nothing needs it."""
        if self._call_ticker is None and not self._closing and (self._ready or self.calls.busy):
            self._call_ticker = self.loop.call_later(self.limits.media_stats_s,
                                                     self._tick_calls)

    def _on_disk(self, job: Callable[[], None] | None) -> None:
        """Run a PlaceStore job on a thread; a failure is logged, no more."""
        if job is not None:
            log_failure(self.loop.run_in_executor(self._disk, job), "keeping our place on disk")

    async def _send(self, event: Event) -> bool:
        """Queue `event` for the host, waiting while our outbox is full."""
        link = self._link
        if link is None or not self._ready:
            self._error("not_connected", "reconnecting to the host; try again once back"
                        if self._retrying is not None else "not in a room")
            return False
        if not await link.offer_when_room(event):
            self._error("not_connected", "the connection is closing")
            return False
        return True

    async def _say(self, text: str, to: str = "") -> str | None:
        try:
            text = check_text(text, self.limits.max_message_bytes)
            if to:                          # the host refuses it too; say why here
                to = check_id(to, "user")
        except Refused as refusal:
            self._error(refusal.code, refusal.message)
            return None
        self._next_id += 1
        msg_id = f"{self._id_prefix}-{self._next_id}"
        place, link = self._place, self._link
        if place is None or not place.seated:
            return msg_id if await self._send(Say(msg_id, text, to)) else None
        if len(place.pending) < MAX_UNCONFIRMED:
            place.pending[msg_id] = text    # until the host confirms it
            if to:
                place.pending_to[msg_id] = to
        async with self._pacing:            # in order, and never over the host's rate
            await self._keep_pace()
            link = self._link
            if link is not None and self._ready and link.accepting:
                await link.offer_when_room(Say(msg_id, text, to))
        return msg_id                       # or, away or dropping: it goes once back

    async def _keep_pace(self) -> None:
        """Wait until the host's flood gate would take one more line."""
        gate = self._gate
        if gate is None:
            return
        wait = gate.wait_s(self.loop.time())
        if wait > 0:
            await asyncio.sleep(wait + 0.001)   # a token's time, to the millisecond
        gate.take(self.loop.time())

    async def _leave(self, wait_for_uploads: bool = False) -> None:
        retrying, link, reader = self._retrying, self._link, self._reader
        self._leaving = True                # whatever ends the connection now: we left
        if retrying is not None and (link is None or not self._ready):
            retrying.cancel()               # away: stop trying, and that is leaving
            await asyncio.gather(retrying, return_exceptions=True)
            if link is not None:
                link.abort("quit")
            if self._place is not None:
                self._session_over("quit")
            return
        if link is None or reader is None:
            return
        if wait_for_uploads:                # files asked for before leaving still go
            await self.files.settle_uploads(reader)
        self.files.drop_downloads("you left the room")
        if self._ready and link.offer(Bye()):
            self._ready = False
            done, _ = await asyncio.wait({reader}, timeout=self.limits.close_timeout_s * 2)
            if done:
                return
        link.abort("quit")
        await asyncio.wait({reader})


# =============================================================================
# 21. COMMANDS: one parser for what a person types
# =============================================================================
# A line typed in the terminal or in the chat window becomes one Command
# value; each front end acts on it through its own table (Command class ->
# handler), so a command means the same everywhere and is parsed once. The
# rules, also in README.md: a command starts the line with one "/" (" /quit"
# is text, like any line with a space first); "//text" sends "/text"; an
# unknown command is refused, never sent as chat; any other line is chat,
# `help` included (the host answers it, to the sender alone). Parsing does
# no I/O: a path is not opened here, a user not looked up.

@dataclasses.dataclass(frozen=True)
class Command:
    """What a typed line asks for; `line` is the line as typed."""
    line: str


@dataclasses.dataclass(frozen=True)
class ChatLine(Command):
    """Send `text` to the room (what most lines are)."""
    text: str


@dataclasses.dataclass(frozen=True)
class PrivateLine(Command):
    """/msg USER TEXT: send `text` to `user` alone (a private line)."""
    user: str
    text: str


@dataclasses.dataclass(frozen=True)
class ListMembers(Command):
    """/who: the members of the room."""


@dataclasses.dataclass(frozen=True)
class Quit(Command):
    """/quit: leave the room."""


@dataclasses.dataclass(frozen=True)
class SendFile(Command):
    """/send PATH [@USER]: a file to the room, or to `to` alone."""
    path: str
    to: str | None


@dataclasses.dataclass(frozen=True)
class AnswerFile(Command):
    """/accept TRANSFER, /decline TRANSFER: take or refuse a file that waits
    for an answer (TRANSFER: the number in its file_offer). A /decline
    whose word is a number names a file if one by that number waits (the
    front end asks the core), else it declines a call from `user`, as
    /decline USER always did."""
    transfer: int
    accept: bool
    user: str = ""


@dataclasses.dataclass(frozen=True)
class CancelFile(Command):
    """/cancel [send|receive] TRANSFER: stop a file on its way, either way."""
    transfer: int
    direction: str | None


@dataclasses.dataclass(frozen=True)
class CallUser(Command):
    """/CHECK USER: call someone in the room, or answer their call."""
    user: str


@dataclasses.dataclass(frozen=True)
class CallAddress(Command):
    """/call IP PORT1 PORT2 (or "IP PORT1 PORT2" and the window's video
    button): a direct call, receiving on local UDP port `listen` and sending
    to `address`:`port`, with no help from the host."""
    address: str
    listen: int
    port: int


@dataclasses.dataclass(frozen=True)
class DeclineCall(Command):
    """/decline USER: refuse USER's call at once."""
    user: str


@dataclasses.dataclass(frozen=True)
class HangUp(Command):
    """/hangup USER ends the call with USER; /hangup alone ends every call."""
    user: str | None


@dataclasses.dataclass(frozen=True)
class Mute(Command):
    """/mute and /unmute: your microphone, in every call."""
    muted: bool


@dataclasses.dataclass(frozen=True)
class Camera(Command):
    """/video off and /video on: your camera, in every call."""
    on: bool


@dataclasses.dataclass(frozen=True)
class Mistyped(Command):
    """A line that looks like a command but isn't one: refused with
    `error{code, message}`, never sent as chat."""
    code: str
    message: str


def parse_command(line: str) -> Command | None:
    """The Command a typed line asks for, or None for a blank line."""
    line = line.rstrip("\r\n")
    if not line.strip():
        return None
    if line.startswith("//"):
        return ChatLine(line, line[1:])     # "//x" sends "/x"
    if not line.startswith("/"):
        return ChatLine(line, line)
    name, _, rest = line.partition(" ")
    name = name.casefold()
    if name == "/quit":
        return Quit(line)
    if name == "/who":
        return ListMembers(line)
    if name == "/msg":
        user, text = parse_msg(rest)
        if not user:
            return Mistyped(line, "no_such_user", _MSG_USAGE)
        if not text.strip():
            return Mistyped(line, "bad_message", _MSG_USAGE)
        return PrivateLine(line, user, text)
    if name == "/send":
        path, to = parse_send(line)
        if not path:
            return Mistyped(line, "not_a_file", "usage: /send PATH  or  /send PATH @USER")
        return SendFile(line, path, to)
    if name == "/accept" or (name == "/decline" and _transfer_number(rest) is not None):
        number = _transfer_number(rest)
        if number is None:
            return Mistyped(line, "no_such_transfer", "usage: /accept TRANSFER (the "
                            "number in the file's offer)")
        return AnswerFile(line, number, name == "/accept", rest.strip())
    if name == "/cancel":
        words = rest.split()
        direction = words.pop(0).casefold() if len(words) == 2 else None
        number = _transfer_number(words[0]) if len(words) == 1 else None
        if number is None or direction not in (None, "send", "receive"):
            return Mistyped(line, "no_such_transfer", "usage: /cancel TRANSFER  or  "
                            "/cancel send TRANSFER  or  /cancel receive TRANSFER")
        return CancelFile(line, number, direction)
    if name in ("/check", "/decline"):
        user = rest.strip()
        if not user:
            shown = "/CHECK" if name == "/check" else name
            return Mistyped(line, "no_such_user", f"usage: {shown} USER")
        return (CallUser if name == "/check" else DeclineCall)(line, user)
    if name == "/call":
        try:
            return CallAddress(line, *parse_call_address(rest))
        except ValueError as exc:
            return Mistyped(line, "bad_call_address", f"{exc}; usage: /call IP PORT1 PORT2 "
                            "(receive on your PORT1, send to their PORT2)")
    if name == "/hangup":
        return HangUp(line, rest.strip() or None)
    if name in ("/mute", "/unmute"):
        return Mute(line, name == "/mute")
    if name == "/video" and rest.strip().casefold() in ("on", "off"):
        return Camera(line, rest.strip().casefold() == "on")
    if name == "/video":
        return Mistyped(line, "unknown_command", "usage: /video off  or  /video on")
    return Mistyped(line, "unknown_command", f"unknown command {name}; type help for "
                    "help (start a line with // to send a literal /)")


_MSG_USAGE = 'usage: /msg USER TEXT  (a User ID with a space in quotes: /msg "li lei" hi)'


def parse_msg(rest: str) -> tuple[str, str]:
    """(user, text) from what follows "/msg ": the first word, or a quoted
    ID (IDs may hold spaces), then the text as typed; ("", "") if no user."""
    rest = rest.lstrip(" ")
    quoted = re.match(r"""(["'])(.+?)\1(?: |\Z)""", rest)
    if quoted:
        return quoted.group(2).strip(), rest[quoted.end():]
    user, _, text = rest.partition(" ")
    return user, text


def _transfer_number(text: str) -> int | None:
    """A transfer number typed (ASCII digits, 1 to 2**31), else None."""
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) <= 2 ** 31:
        return None
    return int(text)


def parse_call_address(text: str) -> tuple[str, int, int]:
    """(address, local port, remote port) from "IP PORT1 PORT2"; ValueError
    with a sentence otherwise. The address must be an IP address (v4 or
    v6), not a name: a call can't wait for a name lookup."""
    parts = text.split()
    if len(parts) != 3:
        raise ValueError("a direct call takes an IP address and two ports")
    address, *ports = parts
    try:
        address = str(ipaddress.ip_address(address.strip("[]")))
    except ValueError:
        raise ValueError(f"{address!r} is not an IP address") from None
    if not all(p.isascii() and p.isdigit() and 0 < int(p) < 65536 for p in ports):
        raise ValueError("ports are numbers from 1 to 65535")
    return address, int(ports[0]), int(ports[1])


def parse_send(line: str) -> tuple[str, str | None]:
    """(path, user or None) from "/send PATH" or "/send PATH @USER".

    PATH is the rest of the line after "/send ", less a final " @USER", so
    names with spaces need no quotes (quotes around the whole path are
    dropped, as a terminal's drag and drop adds them). A leading ~ is the
    home folder.
    """
    rest = line.strip()[len("/send"):].strip()
    to = None
    quoted = re.fullmatch(r"""(["'])(.+?)\1(?:\s+@(.+))?""", rest)
    if quoted:                              # a User ID has no quotes: unambiguous
        rest, to = quoted.group(2), (quoted.group(3) or "").strip() or None
    else:
        path, sep, user = rest.rpartition(" @")
        if sep and user.strip() and not any(ch in user for ch in "/\\"):
            rest, to = path.rstrip(), user.strip()
    return (os.path.expanduser(rest) if rest else ""), to


# =============================================================================
# 22. TERMINAL CLIENT: --cli, stdin lines in, events out (text or JSON)
# =============================================================================
# A thin front end over CLIENT CORE. Each event is printed as one JSON
# object per line (--json, flushed as written) or as a line for a person;
# diagnostics go to stderr. Stdin lines are what a person types, parsed
# by COMMANDS into text to send or a command. Reading stdin happens on its own
# daemon thread so the main thread can notice the end of the session (the
# host going away) while a read is pending.

EXIT_OK = 0
EXIT_REFUSED = 1            # login refused, host unreachable, no host found
EXIT_DISCONNECTED = 3       # the session ended other than by our leaving
# (2 is argparse's, for bad flags.)

_SIGNAL_POLL_S = 0.5        # how often the main thread wakes to notice Ctrl-C
STATS_LINE_EVERY_S = 10.0   # a call's status line for people, at most this often

_EXIT_FOR_REASON = {"quit": EXIT_OK, "refused": EXIT_REFUSED, "unreachable": EXIT_REFUSED,
                    "login_timeout": EXIT_REFUSED}


class Printer:
    """Writes events to stdout as JSON lines or as text for a person.

    Thread-safe; the core's thread and the main thread both print.
    """

    def __init__(self, json_mode: bool, stream: Any = None) -> None:
        self.json_mode = json_mode
        self.stream = stream or sys.stdout
        self._lock = threading.Lock()
        self._progress_shown: dict[tuple, float] = {}   # transfer -> when printed

    def _progress_due(self, event: dict) -> bool:
        """A person gets a progress line per transfer at most once a second."""
        key = (event.get("direction"), event.get("transfer"))
        now = time.monotonic()
        if event["bytes"] in (0, event["size"]) or now - self._progress_shown.get(key, 0) >= 1:
            self._progress_shown[key] = now
            return True
        return False

    def _due(self, event: dict) -> bool:
        """Progress and call status lines are paced for people."""
        kind = event.get("type")
        return (kind != "file_progress" or self._progress_due(event)) and \
            (kind != "media_stats" or self._stats_due(event))

    def _stats_due(self, event: dict) -> bool:
        """A person gets a call's status line every STATS_LINE_EVERY_S at most."""
        key = ("stats", event.get("peer"))
        now = time.monotonic()
        if now - self._progress_shown.get(key, 0) >= STATS_LINE_EVERY_S:
            self._progress_shown[key] = now
            return True
        return False

    def __call__(self, event: dict) -> None:
        if self.json_mode:
            line: str | None = json_line(event)
        elif not self._due(event):
            return
        else:
            line = self.format(event)
            # "Every string from the network is made printable before it
            # reaches a terminal": format() escapes each field, and this
            # pass catches any a line forgot (the newlines are ours).
            line = None if line is None else printable_block(line)
        if line is None:
            return
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()

    @staticmethod
    def format(event: dict) -> str | None:
        """The line a person sees for `event` (None: nothing to show)."""
        kind = event.get("type")
        clock = time.strftime("%H:%M:%S", time.localtime(event.get("ts", time.time())))
        if kind == "message":
            lines = printable_lines(event["text"])
            mark = "  (earlier)" if event.get("history") else ""
            who = printable(event["from"]) + (f" → {printable(event['to'])} (private)"
                                              if event.get("to") else "")
            head = f"[{clock}] {who}: {lines[0]}{mark}"
            return "\n".join([head] + ["    | " + line for line in lines[1:]])
        if kind == "system":
            return f"[{clock}] {printable(event['text'])}"
        if kind == "ready":
            members = ", ".join(printable(m) for m in event["members"])
            locked = " (protected by a password)" if event.get("protected") else ""
            return (f"Joined room {printable(event['room'])}{locked} on "
                    f"{printable(event.get('host') or event['address'])} "
                    f"({event['address']}:{event['port']}) as {printable(event['user'])}."
                    + (f" Host key {show_fingerprint(event['fingerprint'])}."
                       if event.get("fingerprint") else " NOT ENCRYPTED.")
                    + f"\nIn the room: {members}. Type help for help, /quit to leave.")
        if kind == "help":
            return printable_block(event["text"])
        if kind == "members":
            return f"In the room ({len(event['members'])}): " + ", ".join(
                printable(m) for m in event["members"])
        if kind in ("error", "warning"):
            return f"! {printable(event['message'])} ({printable(event['code'])})"
        if kind == "host_key":
            return f"* {printable(event['message'])}"
        if kind == "closed":
            return CLOSED_REASONS.get(event["reason"],
                                      f"Disconnected ({printable(event['reason'])}).")
        if kind == "reconnecting":
            return reconnecting_line(event)
        if kind == "resumed":
            return f"[{clock}] {resumed_line(event)}"
        if kind == "host":
            rooms = ", ".join(f"{printable(r['room'])} ({r['members']})" for r in event["rooms"])
            more = event.get("rooms_total", 0) - len(event["rooms"])
            rooms += f" and {more} more" if more > 0 else ""
            key = show_fingerprint(event["fingerprint"]) if event.get("fingerprint") \
                else "none: not encrypted"
            return (f"{printable(event['name'])}  {event['address']}:{event['port']}  "
                    f"rooms: {rooms or 'none yet'}  key: {key}")
        if kind == "file_offer":
            whom = "you" if event.get("to") else "the room"
            ask = f"; /accept {event['transfer']} or /decline {event['transfer']}" \
                if event.get("ask") else ""
            return (f"[{clock}] {printable(event['from'])} is sending {whom} "
                    f"{printable(event['name'])} ({human_size(event['size'])}){ask}")
        if kind == "file_progress":
            arrow = "->" if event["direction"] == "send" else "<-"
            if not event["bytes"] and event["size"]:
                return f"  {arrow} {printable(event['name'])}: starting " \
                       f"({human_size(event['size'])})"
            eta = event.get("eta")
            left = f", {eta:.0f} s left" if eta is not None and event["bytes"] < \
                event["size"] else ""
            return (f"  {arrow} {printable(event['name'])}: {event['percent']:.0f}% of "
                    f"{human_size(event['size'])}, {human_size(event['rate'])}/s{left}")
        if kind == "file_received":
            return (f"[{clock}] Saved {printable(event['name'])} from "
                    f"{printable(event['from'])}: {printable(event['path'])} "
                    f"({human_size(event['size'])}, SHA-256 {event['sha256'][:12]}...)")
        if kind == "file_sent":
            whom = printable(event["to"]) if event.get("to") else "the room"
            return f"[{clock}] Sent {printable(event['name'])} " \
                   f"({human_size(event['size'])}) to {whom}."
        if kind == "file_delivered":
            return f"[{clock}] {printable(event['user'])} saved {printable(event['name'])}."
        if kind == "file_failed":
            who = f" ({printable(event['user'])})" if event.get("user") else ""
            return (f"! {printable(event.get('name') or 'file')}{who}: "
                    f"{printable(event['reason'])} ({printable(event['code'])})")
        formatter = CALL_LINES.get(kind or "")
        if formatter is not None:
            line = formatter(event)
            return line if kind in ("media_stats", "media_state") else f"[{clock}] {line}"
        if kind == "listening":
            return (f"Hosting as {printable(event['name'])} on {event['address']}:"
                    f"{event['port']}" + (" (advertised on the LAN)"
                                          if event.get("advertised") else "")
                    + (f". Host key {show_fingerprint(event['fingerprint'], full=True)}"
                       if event.get("fingerprint") else ". Plain TCP")
                    + ". Ctrl-C stops.")
        return None


def _call_connected_line(event: dict) -> str:
    code = f"; safety code {event['safety_code']}: compare it by voice" \
        if event.get("safety_code") else ""
    codecs = "/".join(c for c in (event.get("codec"), event.get("audio")) if c) or "no codec"
    return (f"In a call with {printable(event['peer'])} "
            f"({event.get('address')}, {event.get('path')}, {codecs}){code}")


_FAILED_BECAUSE = {"busy": "{peer} did not answer: busy", "declined": "{peer} declined",
                   "call_full": "that call is full", "cancelled": "you cancelled it",
                   "left": "{peer} left", "lost": "{peer} dropped off"}

# The text a person sees for each call event (the terminal puts the time in
# front of those about a call, the window shows them as notices). Only the
# host's own notices (an invitation, a missed call) say [SYSTEM].
CALL_LINES: dict[str, Callable[[dict], str]] = {
    "call_invite": lambda e: f"[SYSTEM] <{printable(e['from'])}> CALL YOU  (/CHECK "
                             f"{printable(e['from'])} to answer, /decline "
                             f"{printable(e['from'])} to refuse)",
    "call_missed": lambda e: f"[SYSTEM] You missed a call from <{printable(e['from'])}>",
    "call_connected": _call_connected_line,
    "call_ended": lambda e: f"The call with {printable(e['peer'])} ended "
                            f"({printable(e['reason'])})",
    "call_failed": lambda e: f"The call to {printable(e['peer'])} failed: "
                             + _FAILED_BECAUSE.get(e["reason"], "{reason}").format(
                                 peer=printable(e["peer"]), reason=printable(e["reason"])),
    "media_stats": lambda e: (
        f"  ~ {printable(e['peer'])}: {e['video_fps']:g} fps, {e['audio_frames']} audio "
        f"frames/s, {100 * e['loss']:.1f}% lost, "
        + (f"{e['latency_ms']:.0f} ms, " if e.get("latency_ms") is not None else "")
        + f"{e['kbps']:.0f} kb/s ({e['path']})"),
    "media_state": lambda e: "Microphone " + ("muted" if e["muted"] else "on")
                             + ", camera " + ("on" if e["video"] else "off") + ".",
}


def human_size(size: float) -> str:
    """1536 -> "1.5 KB" (decimal units, as file managers show them)."""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"                 # pragma: no cover


def printable_lines(text: str) -> list[str]:
    """Lines of a message, each safe to print (see `printable`)."""
    return [printable(line) for line in text.split("\n")] or [""]


def printable_block(text: str) -> str:
    return "\n".join(printable_lines(text))


def json_line(event: dict) -> str:
    """`event` as one line of JSON that is safe on a terminal: what JSON
    leaves raw but could act on one (DEL, C1 controls, bidi and other format
    characters, line and paragraph separators) is written as a \\u escape,
    so json.loads gives back the very same strings."""
    line = json.dumps(event, ensure_ascii=False)
    if line.isprintable():
        return line
    out = []
    for ch in line:
        if ch != " " and not ch.isprintable() and unicodedata.category(ch) != "Zs":
            code = ord(ch)
            if code > 0xFFFF:               # as a UTF-16 surrogate pair, as JSON wants
                code -= 0x10000
                out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
            else:
                out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)




def handle_line(core: ClientCore, line: str, emit: Callable[[dict], None]) -> bool:
    """Act on one typed line (COMMANDS). Returns False when the person
    asked to leave. Waits while our outbox is full, so stdin is read no
    faster than the host takes what we say."""
    command = parse_command(line)
    if isinstance(command, Quit):
        return False
    if command is not None:
        _TERMINAL_COMMANDS[type(command)](core, command, emit)
    return True


def answer_file(core: ClientCore, command: AnswerFile) -> concurrent.futures.Future:
    """/accept or /decline TRANSFER; a /decline of a number no file waits
    under declines a call from the user of that name, as it always did."""
    if command.accept:
        return core.accept_file(command.transfer)
    if not core.waiting_file(command.transfer) and command.user:
        return core.decline(command.user)
    return core.decline_file(command.transfer)


# What the terminal does for each command but Quit (which ends the session).
# Commands whose outcome arrives as events don't wait; text waits while our
# outbox is full.
_TERMINAL_COMMANDS: dict[type[Command], Callable[[ClientCore, Any, Callable], Any]] = {
    ChatLine: lambda core, command, emit: core.say(command.text).result(),
    PrivateLine: lambda core, command, emit: core.say(command.text, command.user).result(),
    ListMembers: lambda core, command, emit: core.who().result(),
    SendFile: lambda core, command, emit: log_failure(
        core.send_file(command.path, command.to), f"sending {command.path}"),
    CallUser: lambda core, command, emit: log_failure(core.call(command.user), "calling"),
    CallAddress: lambda core, command, emit: log_failure(
        core.call_address(command.address, command.listen, command.port), "calling"),
    DeclineCall: lambda core, command, emit: log_failure(core.decline(command.user),
                                                         "declining"),
    AnswerFile: lambda core, command, emit: log_failure(answer_file(core, command),
                                                        "answering a file"),
    CancelFile: lambda core, command, emit: log_failure(
        core.cancel_file(command.transfer, command.direction), "cancelling a file"),
    HangUp: lambda core, command, emit: log_failure(core.hang_up(command.user), "hanging up"),
    Mute: lambda core, command, emit: log_failure(core.set_media(muted=command.muted),
                                                  "muting"),
    Camera: lambda core, command, emit: log_failure(core.set_media(video=command.on),
                                                    "the camera"),
    Mistyped: lambda core, command, emit: emit(
        {"type": "error", "code": command.code, "message": command.message}),
}


def no_host_message(interface: str | None, waited_s: float) -> str:
    """Why no host was found, as far as we can tell, and what to try."""
    where = ", ".join(browsed_interfaces(interface)) or "no network interface with IPv4"
    return (f"no chatroom host answered within {waited_s:g} s; looked on {where}. "
            "Start one with --host, or give its address with --server HOST[:PORT]. If a "
            "host is running: it may be on another network or interface (pick ours with "
            "--interface), or this network blocks multicast (guest Wi-Fi and some routers "
            "do), which --server gets around")


def choose_host(hosts: list[HostInfo], json_mode: bool, emit: Callable[[dict], None],
                stdin: Any, no_host: str = "") -> HostInfo | None:
    """The one host to join, asking the person if several were found."""
    if len(hosts) == 1:
        return hosts[0]
    if not hosts:
        emit({"type": "error", "code": "no_host", "message": no_host or
              "no chatroom host found on the LAN; start one with --host "
              "or give its address with --server HOST[:PORT]"})
        return None
    if json_mode:
        emit({"type": "error", "code": "ambiguous_host",
              "message": f"{len(hosts)} hosts found; pick one with --server or --name",
              "hosts": [h.to_event() for h in hosts]})
        return None
    print("Several hosts were found:")
    for number, host in enumerate(hosts, 1):
        print(f"  {number}. {printable_block(Printer.format(host.to_event()) or '')}")
    while True:
        print(f"Join which one? [1-{len(hosts)}] ", end="", flush=True)
        answer = stdin.readline()
        if not answer:
            return None
        if answer.strip().isdigit() and 1 <= int(answer) <= len(hosts):
            return hosts[int(answer) - 1]


def room_password(args: argparse.Namespace) -> str:
    """--password, else $CHATROOM_PASSWORD, else "" (no password). The window
    uses it too, to fill its password field."""
    if args.password is not None:
        return args.password
    return os.environ.get("CHATROOM_PASSWORD", "")


def known_hosts_from(args: argparse.Namespace) -> KnownHosts | None:
    """The keys a client checks hosts against (None: --insecure)."""
    if args.insecure:
        return None
    return KnownHosts(args.known_hosts or config_dir() / KNOWN_HOSTS_FILE)


def run_terminal(args: argparse.Namespace, limits: Limits, media: MediaOptions) -> int:
    """--cli: join a room and chat from stdin. Returns the exit status."""
    printer = Printer(args.json)
    stdin = sys.stdin
    ended = threading.Event()
    closed_reason: list[str] = []

    def on_event(event: dict) -> None:
        printer(event)
        if event["type"] == "closed":
            closed_reason.append(event["reason"])
            ended.set()

    core = ClientCore(on_event, limits, args.downloads, media,
                      args.state_dir or config_dir(), known_hosts_from(args))
    core.interface = args.interface
    core.files.ask_above = args.ask_above   # before the loop runs: no thread yet
    core.start()
    _leave_on_signals()
    try:
        hosts_at: str | Sequence[str]      # an address or name, or every address advertised
        host_name = ""                      # the name it advertised, if found by it
        if args.server:
            hosts_at, port = parse_server(args.server)
        else:
            hosts = core.submit(discover(args.timeout, interface=args.interface,
                                         settle=limits.discovery_settle_s,
                                         name=args.name)).result()
            chosen = choose_host(hosts, args.json, printer, stdin,
                                 no_host_message(args.interface, args.timeout))
            if chosen is None:
                return EXIT_REFUSED
            hosts_at, port, host_name = chosen.addresses or chosen.address, chosen.port, \
                chosen.name
        if not core.join(hosts_at, port, args.room, args.user, found_on_lan=not args.server,
                         password=room_password(args), host_name=host_name,
                         accept_key="*" if args.accept_new_key else "").result():
            ended.wait(limits.close_timeout_s)
            return EXIT_REFUSED

        def read_stdin() -> None:
            try:
                for line in stdin:
                    if ended.is_set() or not handle_line(core, line, printer):
                        break
            except Exception:               # never leave the session hanging
                log.exception("reading stdin failed")
            log_failure(core.leave(wait_for_uploads=True), "leaving")  # files sent still go

        threading.Thread(target=read_stdin, name="stdin", daemon=True).start()
        while not ended.wait(_SIGNAL_POLL_S):   # a timed wait lets Ctrl-C through
            pass
    except KeyboardInterrupt:
        with contextlib.suppress(ValueError, OSError):
            signal.signal(signal.SIGINT, signal.SIG_DFL)    # a second Ctrl-C: go now
        log_failure(core.leave(), "leaving")
        ended.wait(limits.close_timeout_s * 2)
        closed_reason[:] = ["quit"]
    finally:
        core.stop()
    return _EXIT_FOR_REASON.get(closed_reason[0] if closed_reason else "quit",
                                EXIT_DISCONNECTED)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _leave_on_signals() -> None:
    """Ctrl-C and SIGTERM both leave the room the way /quit does (a `bye`,
    so the room reads "left", not "connection lost"). Ctrl-C too when the
    program was started with SIGINT ignored, as a shell does for `cmd &`:
    a person at this terminal still means it."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(signum, _interrupt)
        except (ValueError, OSError):       # not the main thread, or no such signal
            pass


def run_discover(args: argparse.Namespace) -> int:
    """--discover: list the hosts found within --timeout seconds."""
    printer = Printer(args.json)
    hosts = asyncio.run(discover(args.timeout, interface=args.interface, name=args.name))
    for host in hosts:
        printer(host.to_event())
    if not hosts:
        print(f"No chatroom host answered within {args.timeout:g} s.", file=sys.stderr)
    return EXIT_OK


# =============================================================================
# 23. GUI LOOK: theme, fonts, --scale, the trace hook, anti-aliased drawing
# =============================================================================
# The desktop window is a front end over CLIENT CORE beside the TERMINAL
# CLIENT, spread over nine sections: GUI LOOK (this one) how things look
# and how they are drawn, GUI CONVERSATION the conversation, GUI MEMBERS the
# members list and the emoji picker, GUI PANELS the message box, help,
# search, notifications and drops, GUI WINDOWS the launcher, GUI CHAT WINDOW
# a room's window, GUI CALLS the call window, GUI PLUMBING settings and the
# bridge from the core, GUI APP the app that owns them and the one read loop.
# Together they read the core's event dicts and decide nothing the core
# decides; they own the main thread and never block it.
#
# This section owns the look (a light and a dark palette whose text reaches
# WCAG AA, the system's choice between them, a font that draws Chinese,
# --scale), the trace hook the tests follow the window through, and drawing
# helpers that Tk lacks (anti-aliased discs and rounded boxes); and, pure,
# what the conversation needs to know of text and files: links, day names,
# pictures by content and their thumbnails (OpenCV, off the GUI thread). It
# makes no window and handles no event. PySimpleGUI, tkinter and cv2 are
# imported inside the functions that need them, so `import chatroom` works
# with no display.

GUI_TRACE_ENV = "CHATROOM_GUI_TRACE"  # test hook, see GuiTrace

# Families that draw Simplified Chinese and Latin well, in order of
# preference: Linux (fonts-noto-cjk), Windows, macOS, then older names. The
# first one tkinter.font.families() lists is used for every text of every
# window; with none of them, Tk's default font is used and Chinese depends on
# the system's own fallback (boxes where there is none).
CJK_FONT_FAMILIES = ("Noto Sans CJK SC", "Microsoft YaHei", "PingFang SC",
                     "Source Han Sans SC", "WenQuanYi Micro Hei")

# Two palettes of the same names. Every colour text is drawn in reaches
# WCAG AA (4.5:1) on each background it is drawn on, in both: TEXT_ON lists
# those pairs and tests/test_gui.py checks every one with contrast_ratio.
PALETTES: dict[str, dict[str, str]] = {
    "light": {
        "window": "#F5F6FA",        # window background
        "chat": "#ECEFF5",          # behind the bubbles
        "panel": "#FFFFFF",         # fields, cards, the members list
        "text": "#1F2430",
        "muted": "#5A6170",
        "faint": "#676A72",         # hints, timestamps (was #A3A9B5: 2.2:1)
        "line": "#DCE0E8",
        "accent": "#2D5CBE",
        "accent_dark": "#2853B0",
        "accent_soft": "#DCE6FB",
        "mine": "#2D5CBE",          # my bubbles
        "mine_text": "#FFFFFF",
        "mine_pending": "#5B73A6",  # my bubble before the host confirms it
        "theirs": "#FFFFFF",        # everyone else's
        "system": "#DEE2EA",        # [SYSTEM] notices from the host
        "system_text": "#4A5263",
        "info": "#E1E9FA",          # notes from this program
        "info_text": "#2C4A8A",
        "error": "#FBE3E1",
        "error_text": "#A8261B",
        "ok": "#2E9B5F",
        "track": "#E3E7EE",         # an empty progress bar
        "found": "#E0A100",         # the frame around a search match
    },
    "dark": {
        "window": "#16181D",
        "chat": "#1C1F26",
        "panel": "#242831",
        "text": "#E6E8EE",
        "muted": "#A6ADBB",
        "faint": "#8A919F",
        "line": "#343A46",
        "accent": "#7EA6F2",
        "accent_dark": "#9DBBF5",   # hover: lighter on a dark window
        "accent_soft": "#2B3A5C",
        "mine": "#7EA6F2",
        "mine_text": "#0E1A33",     # dark ink on the light blue
        "mine_pending": "#A7BCE3",
        "theirs": "#2A2F39",
        "system": "#2A2F38",
        "system_text": "#B8BFCC",
        "info": "#1F2C47",
        "info_text": "#A9C2F5",
        "error": "#4A2326",
        "error_text": "#F2887E",
        "ok": "#4CC38A",
        "track": "#343A46",
        "found": "#F2C14E",
    },
}
COLOURS = dict(PALETTES["light"])   # the palette in use; use_palette() changes it in place
THEMES = ("light", "dark", "system")    # --theme; "system" asks the desktop (system_theme)

# (text, background): each colour text is drawn in, on each background it
# is drawn on, by any window (labels, bubbles, cards, buttons, hovers, the
# picked member, the unsent bubble whose fill is `faint`).
TEXT_ON: tuple[tuple[str, str], ...] = (
    ("text", "window"), ("text", "panel"), ("text", "theirs"), ("text", "accent_soft"),
    ("muted", "window"), ("muted", "chat"), ("muted", "panel"), ("muted", "theirs"),
    ("muted", "accent_soft"), ("faint", "window"), ("faint", "chat"), ("faint", "panel"),
    ("accent", "window"), ("accent", "panel"), ("accent", "theirs"),
    ("accent", "accent_soft"), ("accent", "line"), ("mine_text", "accent"),
    ("mine_text", "accent_dark"), ("mine_text", "mine"), ("mine_text", "mine_pending"),
    ("mine_text", "faint"), ("system_text", "system"), ("info_text", "info"),
    ("error_text", "error"), ("error_text", "window"), ("error_text", "chat"),
    ("error_text", "theirs"), ("error_text", "accent_soft"))
WCAG_AA = 4.5                       # the least contrast for text (WCAG 2.1, 1.4.3)

# Avatar backgrounds: dark enough for white initials (4.5:1), distinct in pairs.
AVATAR_COLOURS = ("#BE5250", "#A5652B", "#8F7015", "#3E8255", "#26807A", "#3478BB",
                  "#5C6BD6", "#885EC8", "#B0529E", "#BC5076", "#647C36", "#707581")
AVATAR_INK = "#FFFFFF"              # the initials on an avatar

_ROOM = "-LAUNCHER-"                # the launcher's element keys: (_ROOM, name)
_CHAT = "-CHAT-"                    # the chat window's: (_CHAT, name)
NET_EVENT = "-NET-"                 # ("-NET-", type): an event from the core
CORE_EVENT = "-CORE-"               # ("-CORE-", what): a command's outcome


# --- The look: fonts, avatars, theme, --scale --------------------------------

def pick_font_family(available: Iterable[str]) -> str | None:
    """The first of CJK_FONT_FAMILIES in `available`, or None."""
    names = set(available)
    return next((family for family in CJK_FONT_FAMILIES if family in names), None)


def avatar_colour(user: str) -> str:
    """A colour for `user`'s avatar: the same on every machine and every run
    (from SHA-256 of the ID's identity, not Python's salted hash)."""
    digest = hashlib.sha256(("chatroom avatar " + id_key(user)).encode("utf-8")).digest()
    return AVATAR_COLOURS[digest[0] % len(AVATAR_COLOURS)]


def initials(user: str) -> str:
    """What an avatar shows: one wide character (小明 -> 小), else the first
    letter of the first two words (Ada Lovelace -> AL, bob -> B)."""
    words = [w for w in re.split(r"[\s_.\-]+", user.strip()) if w]
    if not words:
        return "?"
    first = words[0][0]
    if unicodedata.east_asian_width(first) in "WF":
        return first
    letters = "".join(w[0] for w in words[:2] if unicodedata.category(w[0])[0] in "LN")
    return (letters or first).upper()


def parse_scale(text: str) -> float:
    """--scale: a factor from 0.5 to 4 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.5 <= value <= 4:
        raise argparse.ArgumentTypeError("--scale takes a factor from 0.5 to 4")
    return value


def _clock(ts: float) -> str:
    """"14:02" today, "03 Mar 14:02" on another day."""
    when, now = time.localtime(ts), time.localtime()
    return time.strftime("%H:%M" if when[:3] == now[:3] else "%d %b %H:%M", when)


@dataclasses.dataclass(frozen=True)
class Look:
    """The fonts and sizes of every window.

    `family` is the font family for all text; `scaling` is Tk's pixels per
    point (the screen's own value times --scale); `unit` turns a size designed
    for 100% on a 96-dpi screen into pixels, so `px(n)` grows with --scale
    exactly as the fonts do.
    """
    family: str
    scaling: float
    unit: float

    def px(self, size: float) -> int:
        return max(1, round(size * self.unit))

    def font(self, points: int, style: str = "") -> tuple:
        return (self.family, points, style) if style else (self.family, points)


def measure_screen(scale: float) -> Look:
    """The Look for this display: asks Tk which fonts it has and its scaling.

    Uses a throwaway Tk root because PySimpleGUI's own is made with the first
    window, and the fonts must be known before any layout is written.
    """
    import tkinter
    import tkinter.font
    root = tkinter.Tk()
    root.withdraw()
    try:
        family = (pick_font_family(tkinter.font.families(root))
                  or tkinter.font.nametofont("TkDefaultFont", root).actual("family"))
        scaling = float(root.tk.call("tk", "scaling")) * scale
    finally:
        root.destroy()
    return Look(family=family, scaling=scaling, unit=scaling / (96 / 72))


def apply_theme(look: Look) -> None:
    """One PySimpleGUI theme and default options for every window."""
    import PySimpleGUI as sg
    sg.theme_add_new("chatroom", {
        "BACKGROUND": COLOURS["window"], "TEXT": COLOURS["text"],
        "INPUT": COLOURS["panel"], "TEXT_INPUT": COLOURS["text"],
        "SCROLL": COLOURS["line"], "BUTTON": (COLOURS["mine_text"], COLOURS["accent"]),
        "PROGRESS": (COLOURS["accent"], COLOURS["track"]), "BORDER": 0,
        "SLIDER_DEPTH": 0, "PROGRESS_DEPTH": 0})
    sg.theme("chatroom")
    sg.set_options(font=look.font(10), scaling=look.scaling, dpi_awareness=True,
                   element_padding=(look.px(4), look.px(3)),
                   margins=(look.px(18), look.px(14)), border_width=0,
                   use_ttk_buttons=False, suppress_error_popups=True)


# --- Themes: contrast, the system's choice, switching while windows show -----

def contrast_ratio(ink: str, paper: str) -> float:
    """WCAG 2.1's contrast ratio of two "#RRGGBB" colours, from 1 (the
    same) to 21 (black on white): (L1 + 0.05) / (L2 + 0.05), L1 the
    relative luminance of the lighter one. Raises ValueError for a colour
    that is not "#RRGGBB"."""
    def luminance(colour: str) -> float:
        if not re.fullmatch(r"#[0-9A-Fa-f]{6}", colour):
            raise ValueError(f"not a #RRGGBB colour: {colour!r}")
        linear = [(c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4)
                  for c in (value / 255 for value in _rgb(colour))]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    light, dark = sorted((luminance(ink), luminance(paper)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


def _ask_command(argv: list[str]) -> str:
    """A desktop setting from a command's output; "" if it can't say."""
    import subprocess  # here: only the window asks the desktop
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=2,
                              stdin=subprocess.DEVNULL, check=False).stdout
    except (OSError, subprocess.SubprocessError, ValueError):
        return ""


def _windows_theme() -> str:  # pragma: no cover (Windows only)
    """"dark" when Windows' apps are set to dark (AppsUseLightTheme = 0)."""
    import winreg  # type: ignore[import-not-found,unused-ignore]
    with winreg.OpenKey(winreg.HKEY_CURRENT_USER,  # type: ignore[attr-defined,unused-ignore]
                        r"Software\Microsoft\Windows\CurrentVersion\Themes\Personalize") \
            as key:
        value, _kind = winreg.QueryValueEx(key, "AppsUseLightTheme")  # type: ignore[attr-defined,unused-ignore]
    return "light" if value else "dark"


def system_theme(platform: str | None = None, environ: typing.Mapping[str, str] | None = None,
                 ask: Callable[[list[str]], str] = _ask_command) -> str:
    """"dark" or "light", as the desktop is set where that can be read:
    Windows' AppsUseLightTheme, macOS' AppleInterfaceStyle, GTK_THEME ending
    in ":dark" or GNOME's color-scheme on Linux. Anything that fails or
    can't say means "light"; nothing here raises."""
    platform = platform or sys.platform
    environ = os.environ if environ is None else environ
    try:
        if platform == "win32":
            return _windows_theme()
        if platform == "darwin":
            answer = ask(["defaults", "read", "-g", "AppleInterfaceStyle"])
            return "dark" if answer.strip().lower() == "dark" else "light"
        if environ.get("GTK_THEME", "").lower().endswith(":dark"):
            return "dark"
        answer = ask(["gsettings", "get", "org.gnome.desktop.interface", "color-scheme"])
        return "dark" if "dark" in answer.lower() else "light"
    except (OSError, ValueError, ImportError):
        return "light"


def resolve_theme(flag: str | None, remembered: str | None,
                  system: Callable[[], str] = system_theme) -> str:
    """The palette to start with: --theme if given, else the one last
    toggled (settings), else the system's; "system" asks `system`."""
    choice = flag or remembered or "system"
    return choice if choice in PALETTES else system()


def use_palette(name: str) -> dict[str, str]:
    """Make `name` the palette in use (COLOURS, changed in place: every
    painter reads it when it draws); returns the one it replaces."""
    old = dict(COLOURS)
    COLOURS.clear()
    COLOURS.update(PALETTES[name])
    return old


def theme_button_text() -> str:
    """The theme toggle's label: the theme it switches to."""
    return "Light theme" if PALETTES["dark"] == COLOURS else "Dark theme"


# Which palette name a Tk colour option stands for when two names share a
# value (in light, `panel`, `theirs` and `mine_text` are all white): text
# options mean ink, the others paper.
_INK_OPTIONS = ("foreground", "activeforeground", "disabledforeground", "insertbackground",
                "selectforeground")
_PAPER_OPTIONS = ("background", "activebackground", "disabledbackground",
                  "readonlybackground", "selectbackground", "highlightbackground",
                  "troughcolor", "selectcolor")
_WIDGET_INKS = ("text", "muted", "faint", "accent", "mine_text", "error_text")
_WIDGET_PAPERS = ("window", "panel", "chat", "accent", "accent_soft", "error", "line",
                  "track", "accent_dark")


def recolour_map(old: dict[str, str], new: dict[str, str]) -> dict[str, dict[str, str]]:
    """{"ink": {old value: new value}, "paper": {...}} for switching
    palettes: where names share a value, the ones widgets use win."""
    out: dict[str, dict[str, str]] = {}
    for role, preferred in (("ink", _WIDGET_INKS), ("paper", _WIDGET_PAPERS)):
        table = out[role] = {}
        for name in sorted(old, key=lambda n: n in preferred):     # preferred last: they win
            table[old[name].upper()] = new[name]
    return out


def recolour_widgets(root: Any, old: dict[str, str], new: dict[str, str]) -> int:
    """Give `root` and every widget in it the colours of `new` where they
    had those of `old`; returns how many options changed. Canvas drawings
    are not touched (their owners paint them again)."""
    import tkinter
    table = recolour_map(old, new)
    changed = 0
    stack = [root]
    while stack:
        widget = stack.pop()
        stack.extend(widget.winfo_children())
        try:
            options = widget.configure() or {}
        except tkinter.TclError:        # a widget that refuses the query: skip it
            continue
        for role, names in (("ink", _INK_OPTIONS), ("paper", _PAPER_OPTIONS)):
            for option in names:
                if option not in options:
                    continue
                value = str(widget.cget(option)).upper()
                if value in table[role] and table[role][value].upper() != value:
                    widget.configure(**{option: table[role][value]})
                    changed += 1
    return changed


# --- The trace hook ----------------------------------------------------------

class GuiTrace:
    """Test hook: with CHATROOM_GUI_TRACE=1 in the environment, the window
    also prints what it does as JSON lines on stdout (events handled, what
    it drew and where, window ids, loop timings) for tests to follow."""

    def __init__(self, enabled: bool, stream: Any = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stdout

    def __call__(self, what: str, **fields: Any) -> None:
        if self.enabled:
            self.stream.write(json.dumps({"gui": what, **fields}, ensure_ascii=False,
                                         default=str) + "\n")
            self.stream.flush()


# --- Drawing: anti-aliased shapes as images ----------------------------------
# Tk's canvas draws ovals and curves without anti-aliasing, so a round avatar
# or a bubble's corner would look jagged. These are small images instead,
# computed once per size and colour: each pixel is the fill blended over the
# background by how much of it the shape covers.

def _rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def app_icon_png(size: int = 64) -> bytes:
    """The program's icon, a blue speech bubble with three dots, as PNG
    bytes (drawn here, so the single file needs no image beside it).

    Each shape is a signed distance (negative inside, in icon widths); a
    pixel is covered by 0.5 minus its distance in pixels, which anti-aliases
    the edges in one pass (a few milliseconds at 64 x 64)."""
    tail = ((0.2, 0.66), (0.42, 0.8), (0.13, 0.93))     # a triangle, clockwise on screen
    edges = []
    for (x1, y1), (x2, y2) in zip(tail, tail[1:] + tail[:1]):
        length = math.hypot(x2 - x1, y2 - y1)
        edges.append((x1, y1, (y2 - y1) / length, (x1 - x2) / length))   # outward normal

    def cover(distance: float) -> float:
        return min(1.0, max(0.0, 0.5 - distance * size))

    blue = _rgb(COLOURS["accent"])
    rows = []
    for row in range(size):
        line = bytearray(b"\0")             # PNG filter type 0 for each row
        y = (row + 0.5) / size
        for column in range(size):
            x = (column + 0.5) / size
            bubble = min(math.hypot(x - 0.5, y - 0.46) - 0.40,
                         max((x - ex) * nx + (y - ey) * ny for ex, ey, nx, ny in edges))
            dots = min(math.hypot(x - dx, y - 0.46) for dx in (0.32, 0.5, 0.68)) - 0.055
            white = cover(dots)
            line += bytes(round(c + (255 - c) * white) for c in blue)
            line.append(round(255 * cover(bubble)))
        rows.append(bytes(line))
    return _png(size, rows)


def lock_icon_png(size: int) -> bytes:
    """A padlock (the mark of a room with a password) as PNG bytes, drawn
    like the icon: no font here has U+1F512, and a box would show instead."""
    ink = _rgb(COLOURS["muted"])

    def cover(distance: float) -> float:
        return min(1.0, max(0.0, 0.5 - distance * size))

    rows = []
    for row in range(size):
        line = bytearray(b"\0")
        y = (row + 0.5) / size
        for column in range(size):
            x = (column + 0.5) / size
            qx, qy = abs(x - 0.5) - 0.30, abs(y - 0.70) - 0.22     # the body: a rounded box
            body = math.hypot(max(qx, 0), max(qy, 0)) + min(max(qx, qy), 0) - 0.06
            arc = (math.hypot(x - 0.5, y - 0.42) if y < 0.42 else abs(abs(x - 0.5) - 0.2)
                   + 0.2) - 0.2            # the shackle: an arch on two legs, 0.13 thick
            shackle = abs(arc) - 0.065 if y < 0.6 else 1.0
            line += bytes(ink)
            line.append(round(255 * cover(min(body, shackle))))
        rows.append(bytes(line))
    return _png(size, rows)


def _png(size: int, rows: list[bytes]) -> bytes:
    """A square 8-bit RGBA PNG from its filtered rows."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", size, size, 8, 6, 0, 0, 0)    # 8-bit RGBA
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"".join(rows), 9)) + chunk(b"IEND", b""))


class Images:
    """Anti-aliased discs and bubble corners as Tk images, cached (Tk frees
    an image as soon as Python drops it, so the cache also keeps them)."""

    def __init__(self) -> None:
        self._cache: dict[tuple, Any] = {}

    def icon(self, size: int) -> bytes:
        """The program's icon (app_icon_png), base64 as PySimpleGUI takes it."""
        key = ("icon", size)
        if key not in self._cache:
            import base64
            self._cache[key] = base64.b64encode(app_icon_png(size))
        return self._cache[key]

    def lock(self, size: int) -> bytes:
        """The padlock of a protected room (lock_icon_png), base64."""
        key = ("lock", size)
        if key not in self._cache:
            import base64
            self._cache[key] = base64.b64encode(lock_icon_png(size))
        return self._cache[key]

    def disc(self, diameter: int, fill: str, background: str) -> Any:
        return self._image(("disc", diameter, fill, background), diameter, diameter,
                           diameter / 2, diameter / 2, diameter / 2, fill, background)

    def corner(self, radius: int, which: str, fill: str, background: str) -> Any:
        """One quarter disc, `which` in "nw ne sw se", for a rounded box."""
        cx = radius if "w" in which else 0
        cy = radius if "n" in which else 0
        return self._image(("corner", radius, which, fill, background), radius, radius,
                           cx, cy, radius, fill, background)

    def _image(self, key: tuple, width: int, height: int, cx: float, cy: float,
               radius: float, fill: str, background: str) -> Any:
        image = self._cache.get(key)
        if image is None:
            import tkinter
            image = tkinter.PhotoImage(width=width, height=height)
            ink, paper = _rgb(fill), _rgb(background)
            rows = []
            for y in range(height):
                row = []
                for x in range(width):
                    cover = min(1.0, max(0.0, radius + 0.5 - math.hypot(x + 0.5 - cx,
                                                                         y + 0.5 - cy)))
                    red, green, blue = (round(p + (i - p) * cover)
                                        for i, p in zip(ink, paper))
                    row.append(f"#{red:02x}{green:02x}{blue:02x}")
                rows.append("{" + " ".join(row) + "}")
            image.put(" ".join(rows))
            self._cache[key] = image
        return image


class Drawing:
    """Drawing helpers over one tk Canvas: rounded boxes, avatars, elided text.
    `background` is the colour the anti-aliased edges blend into."""

    def __init__(self, widget: Any, look: Look, images: Images, background: str) -> None:
        import tkinter.font
        self.widget = widget
        self.look = look
        self.images = images
        self.background = background
        self.fonts = {name: tkinter.font.Font(root=widget, font=spec) for name, spec in {
            "body": look.font(11), "small": look.font(9), "name": look.font(9, "bold"),
            "bold": look.font(10, "bold"), "label": look.font(7, "bold"),
            "initials": look.font(11, "bold"), "initials_small": look.font(9, "bold"),
        }.items()}

    def box(self, tags: Any, x1: float, y1: float, x2: float, y2: float, radius: int,
            fill: str) -> None:
        """A filled box with anti-aliased round corners: two rectangles in a
        cross and four corner images, all tagged `tags`. Its corners blend
        into `self.background`."""
        x1, y1, x2, y2 = round(x1), round(y1), round(x2), round(y2)
        r = max(1, min(radius, (x2 - x1) // 2, (y2 - y1) // 2))
        draw = self.widget
        draw.create_rectangle(x1 + r, y1, x2 - r, y2, fill=fill, outline="", tags=tags)
        draw.create_rectangle(x1, y1 + r, x2, y2 - r, fill=fill, outline="", tags=tags)
        for which, x, y in (("nw", x1, y1), ("ne", x2 - r, y1), ("sw", x1, y2 - r),
                            ("se", x2 - r, y2 - r)):
            draw.create_image(x, y, anchor="nw", tags=tags,
                              image=self.images.corner(r, which, fill, self.background))

    def avatar(self, tags: Any, x: float, y: float, size: int, user: str,
               colour: str | None = None, text: str | None = None,
               background: str | None = None) -> None:
        """A round avatar, top-left at (x, y): `user`'s colour and initials
        (or `colour` and `text`), blending into `background` (or ours)."""
        disc = self.images.disc(size, colour or avatar_colour(user),
                                background or self.background)
        self.widget.create_image(round(x), round(y), anchor="nw", tags=tags, image=disc)
        font = "initials" if size >= self.look.px(30) else "initials_small"
        self.widget.create_text(x + size / 2, y + size / 2, text=text or initials(user),
                                fill=AVATAR_INK, font=self.fonts[font], tags=tags)

    def elide(self, text: str, font: str, width: int, keep: str = "") -> str:
        """`text` cut to `width` pixels in `font`, with an ellipsis if cut;
        `keep` follows it whole (see elide_text)."""
        return elide_text(text, width, self.fonts[font].measure, keep)


def elide_text(text: str, width: int, measure: Callable[[str], int], keep: str = "") -> str:
    """`text` + `keep`, fitting `width` as `measure` counts: `text` is cut
    (with "...") so that `keep`, a marker such as "  (you)", always shows
    whole. Only if `keep` alone is too wide is it cut too."""
    if measure(text + keep) <= width:
        return text + keep
    if measure("..." + keep) > width:
        return elide_text(text + keep, width, measure)
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if measure(text[:middle] + "..." + keep) <= width:
            low = middle
        else:
            high = middle - 1
    return text[:low].rstrip() + "..." + keep


# --- Text and pictures in the conversation (pure, or off the GUI thread) -------
# What ChatView needs to know about what it draws: where the links in a text
# are, what to call a day, and whether a received file is a picture, with a
# thumbnail made from it. None of it touches Tk, so a worker thread may run it.

# A link is http:// or https:// and what follows up to a space or a quote;
# nothing else (file:, javascript:) is ever a link here.
_LINK_RE = re.compile(r"(?<![A-Za-z0-9+.-])https?://[^\s<>\"'`\u3000-\u303f\uff01-\uff5e]+",
                      re.IGNORECASE)
_LINK_TAIL = ".,;:!?*'\"-"          # punctuation after a link ends the sentence, not the link
_LINK_PAIRS = {")": "(", "]": "[", "}": "{"}

PICTURE_MAX_BYTES = 64 * 1024 * 1024    # a bigger "picture" shows as a plain card
PICTURE_MAX_PIXELS = 40_000_000         # width x height read from its header, before decoding
_PICTURE_HEAD_BYTES = 256 * 1024        # where a JPEG's size must appear (after its EXIF)


def find_links(text: str) -> list[tuple[int, int, str]]:
    """The http/https links in `text`: (start, end, url) in order, each
    without the punctuation that ends a sentence, and with a closing bracket
    only when the link opened it ("(see https://x.org/a_(b))" keeps "(b)")."""
    links = []
    for match in _LINK_RE.finditer(text):
        url = match.group()
        while url:
            last = url[-1]
            if not (last in _LINK_TAIL or (last in _LINK_PAIRS and url.count(
                    _LINK_PAIRS[last]) < url.count(last))):
                break
            url = url[:-1]
        if len(url) > len("https://") and "://" in url and url.split("://", 1)[1]:
            links.append((match.start(), match.start() + len(url), url))
    return links


def day_label(ts: float, now: float | None = None) -> str:
    """What a date divider says for a message sent at `ts`: "Today",
    "Yesterday", "Monday 2 March" this year, else "2 March 2025"."""
    day = datetime.date.fromtimestamp(ts)
    today = datetime.date.fromtimestamp(time.time() if now is None else now)
    if day == today:
        return "Today"
    if day == today - datetime.timedelta(days=1):
        return "Yesterday"
    if day.year == today.year:
        return f"{day:%A} {day.day} {day:%B}"
    return f"{day.day} {day:%B %Y}"


def picture_kind(head: bytes) -> str | None:
    """"png", "jpeg", "gif", "bmp" or "webp" from a file's first bytes (its
    content, never its name), or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head.startswith(b"BM") and len(head) >= 26:
        return "bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def picture_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) as a picture's header states it, read without
    decoding it (so a decompression bomb is refused before it explodes), or
    None if the header is broken or not where it must be."""
    kind = picture_kind(head)
    try:
        if kind == "png" and head[12:16] == b"IHDR":
            return struct.unpack(">II", head[16:24])
        if kind == "gif":
            return struct.unpack("<HH", head[6:10])
        if kind == "bmp":
            width, height = struct.unpack("<ii", head[18:26])
            return abs(width), abs(height)
        if kind == "webp":
            chunk = head[12:16]
            if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
                width, height = struct.unpack("<HH", head[26:30])
                return width & 0x3FFF, height & 0x3FFF
            if chunk == b"VP8L" and head[20] == 0x2F:
                bits = int.from_bytes(head[21:25], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if chunk == b"VP8X":
                return (int.from_bytes(head[24:27], "little") + 1,
                        int.from_bytes(head[27:30], "little") + 1)
        if kind == "jpeg":
            at = 2
            while at + 9 < len(head):       # markers up to the frame header (SOFn)
                if head[at] != 0xFF:
                    return None
                marker = head[at + 1]
                if marker == 0xFF:          # fill byte
                    at += 1
                    continue
                length = struct.unpack(">H", head[at + 2:at + 4])[0]
                if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                    height, width = struct.unpack(">HH", head[at + 5:at + 9])
                    return width, height
                at += 2 + length
    except (struct.error, IndexError):
        pass
    return None


def picture_thumbnail(path: str | Path, max_width: int, max_height: int
                      ) -> tuple[int, int, bytes] | None:
    """A thumbnail of the picture at `path`, at most max_width x max_height
    and never enlarged, as (width, height, PPM bytes) for a Tk PhotoImage;
    None if it isn't a picture (by content), is too big (PICTURE_MAX_BYTES,
    or PICTURE_MAX_PIXELS by its header), or doesn't decode. Blocks (file
    I/O and OpenCV): call it off the GUI thread. Never raises for a bad file."""
    try:
        with open(path, "rb") as f:
            head = f.read(_PICTURE_HEAD_BYTES)
            if picture_kind(head) is None or os.fstat(f.fileno()).st_size > PICTURE_MAX_BYTES:
                return None
            size = picture_size(head)
            if size is None or not 0 < size[0] * size[1] <= PICTURE_MAX_PIXELS:
                return None
            data = head + f.read()
    except OSError:
        return None
    try:
        import cv2
        import numpy
    except ImportError:                     # pragma: no cover (cv2 ships with the window)
        return None
    width, height = size
    scale = min(max_width / width, max_height / height, 1.0)
    # JPEG decodes straight at 1/2, 1/4 or 1/8 of its size: less memory and time.
    flags = cv2.IMREAD_COLOR
    for factor, flag in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                         (2, cv2.IMREAD_REDUCED_COLOR_2)):
        if scale * factor <= 1:
            flags = flag
            break
    try:
        image = cv2.imdecode(numpy.frombuffer(data, numpy.uint8), flags)
    except cv2.error:
        return None
    if image is None or image.ndim != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        return None
    out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
    if (image.shape[1], image.shape[0]) != (out_w, out_h):
        image = cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_AREA)
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return out_w, out_h, b"P6 %d %d 255\n" % (out_w, out_h) + rgb.tobytes()


# =============================================================================
# 24. GUI CONVERSATION: bubbles, notices, file cards, links, pictures, copying
# =============================================================================
# The chat window's conversation canvas, drawn with GUI LOOK's helpers.
# ChatView is the conversation: a person's message is always a bubble with
# an avatar (one per run of a sender's messages), and a [SYSTEM] notice is
# drawn only from the host's `system` events, so no text a user sends can
# look like one. It selects and copies text, opens links, and shows
# received pictures as thumbnails made on a worker thread. It reports clicks
# by posting an event to the read loop (GUI APP) and never talks to the core.

_RELAYOUT_DELAY_MS = 80             # a resize redraws once the edge rests this long
_MESSAGE_MARKS = {"sending": "Sending...", "late": "Not confirmed by the host yet",
                  "unsent": "Not sent: the connection ended",
                  "refused": "Not sent: the host refused it (see below)"}
_PAINT_EVERY_S = 0.1                # during a flood, make Tk paint at least this often
_GROUP_GAP_S = 5 * 60               # a sender's next message after this gap gets its head again
_GROUPED_KINDS = ("message", "file")    # entries that a sender's name and avatar head
_THUMB_SIZE = (276, 200)            # a picture's thumbnail at most, at 100%
_THUMB_POLL_MS = 40                 # how often the view looks for finished thumbnails


@dataclasses.dataclass(eq=False)
class ChatEntry:
    """One thing in the conversation. `data` is all it takes to draw it again
    (after a resize, or when a file's progress changes)."""
    kind: str                       # a key of ChatView.painters
    data: dict
    tag: str                        # every canvas item of the entry has it
    top: int = 0
    bottom: int = 0
    text_item: int = 0              # the item holding its main text
    links: dict[str, int] = dataclasses.field(default_factory=dict)  # clickable items
    grouped: bool = False           # under the previous entry's name and avatar
    urls: dict[str, str] = dataclasses.field(default_factory=dict)   # link name -> URL
    shown_text: str = ""            # the text as drawn (wrapped by us where it has links)
    origin: list[int] | None = None     # shown_text index -> text index (-1: a break we made)


class ChatView(Drawing):
    """The conversation, drawn on a tk Canvas, newest at the bottom.

    A person's message is always a bubble under an avatar, a name and a
    time (one for each run of a sender's messages): mine on the right,
    everyone else's on the left. A [SYSTEM] notice is a centred grey line and
    nothing else is drawn that way, so no text a user sends can look like
    one. Notes from this program (errors, the answer to /who) are centred
    too, in their own colours. Keeps the last `max_shown` entries; follows
    new ones while you are at the bottom, and counts them in a "↓ N new
    messages" pill while you are not. A click selects a bubble's text, Ctrl+C
    or the right-click menu copies it; links open in the browser.
    """

    def __init__(self, widget: Any, look: Look, images: Images,
                 post: Callable[[tuple, Any], None], trace: GuiTrace,
                 max_shown: int = GUI_MAX_SHOWN) -> None:
        super().__init__(widget, look, images, COLOURS["chat"])
        self.post = post                    # sends ("-CHAT-", ...) events to the loop
        self.trace = trace
        self.max_shown = max_shown          # entries kept; older ones go
        self.entries: collections.deque[ChatEntry] = collections.deque()
        self.files: dict[tuple[str, int], ChatEntry] = {}   # (direction, transfer)
        self._names = itertools.count()
        self._width = max(int(widget.cget("width")), look.px(320))
        self._y = self._margin = look.px(14)
        self._relayout_job: str | None = None
        self._painted = 0.0                 # when we last made Tk paint (see add)
        self._paint_report_job: str | None = None   # trace: a `painted` record to come
        self._by_tag: dict[str, ChatEntry] = {}     # entry.tag -> entry, for clicks
        self._day: datetime.date | None = None      # the day of the last dated entry
        self._in_history = False            # the last message was from a history replay
        self._unseen = 0                    # messages arrived below while scrolled up
        self._press: tuple[ChatEntry, float, float] | None = None   # where a drag began
        self._dragged = False
        self._menu: Any = None              # the right-click menu while it is up
        self._lit: tuple[str, str, str] | None = None   # (tag, under, over): links drawn selected
        self._photos: dict[str, Any] = {}   # entry.tag -> its thumbnail (a Tk PhotoImage)
        self._thumbs: list[tuple[ChatEntry, concurrent.futures.Future]] = []
        self._thumb_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._thumb_job: str | None = None
        import tkinter.font
        self.fonts["link"] = tkinter.font.Font(root=widget, font=look.font(11, "underline"))
        widget.configure(yscrollincrement=look.px(24), background=self.background,
                         selectbackground=COLOURS["accent_soft"],
                         selectforeground=COLOURS["text"], selectborderwidth=0)
        widget.bind("<Configure>", self._on_configure)
        for sequence in ("<MouseWheel>", "<Button-4>", "<Button-5>"):
            widget.bind(sequence, self._on_wheel)
        widget.bind("<ButtonPress-1>", self._on_press)
        widget.bind("<B1-Motion>", self._on_drag)
        widget.bind("<ButtonRelease-1>", self._on_release)
        widget.bind("<Button-3>", self._on_menu)
        widget.tag_bind("pill", "<ButtonRelease-1>", lambda _e: self.to_bottom())
        widget.tag_bind("pill", "<Enter>", lambda _e: widget.configure(cursor="hand2"))
        widget.tag_bind("pill", "<Leave>", lambda _e: widget.configure(cursor=""))
        for sequence in ("<Control-c>", "<Control-C>", "<<Copy>>"):
            widget.bind(sequence, lambda _e: self.copy())
        # Whoever scrolls the view (wheel, scrollbar, a jump), its scrollbar
        # hears of it here first: the new-messages pill goes at the bottom.
        scrolled = widget.cget("yscrollcommand")
        widget.configure(yscrollcommand=lambda first, last: self._on_scrolled(
            scrolled, first, last))

    # --- what the chat window calls ---

    def add(self, kind: str, **data: Any) -> ChatEntry:
        """Draw a new entry at the bottom; returns it. A message or card
        from another day than the one before gets a date divider above it
        ("Today", "Yesterday", a date); the first live message after a
        history replay gets "New messages" above it; a sender's next
        message within _GROUP_GAP_S goes under the same name and avatar."""
        follow = self._at_bottom() or data.get("mine")
        ts = data.get("ts")
        added = []
        if ts is not None:
            day = datetime.date.fromtimestamp(ts)
            if day != self._day:
                self._day = day
                added.append(self._append(ChatEntry(
                    "day", {"ts": ts, "text": day_label(ts)}, f"e{next(self._names)}")))
        if kind == "message":
            if data.get("history"):
                self._in_history = True
            elif self._in_history:
                self._in_history = False
                added.append(self._append(ChatEntry("divider", {"text": "New messages"},
                                                    f"e{next(self._names)}")))
        entry = self._append(ChatEntry(kind, data, f"e{next(self._names)}"))
        added.append(entry)
        while len(self.entries) > self.max_shown:
            self._forget(self.entries.popleft())
        self._set_scrollregion()
        if follow:
            self.widget.yview_moveto(1.0)
        elif kind in _GROUPED_KINDS:
            self._unseen += 1               # arrived below, out of sight
            self._show_pill()
        if time.monotonic() - self._painted > _PAINT_EVERY_S:
            # Tk paints when it has nothing else to do; a flood of events
            # would leave the screen stale until it ends. Paint now and then.
            self._painted = time.monotonic()
            self.widget.update_idletasks()
        if self.trace.enabled:
            for shown in added:
                self.trace("shown", kind=shown.kind, **{
                    k: v for k, v in shown.data.items()
                    if isinstance(v, (str, int, float, bool))},
                    grouped=shown.grouped, top=shown.top, bottom=shown.bottom,
                    links={name: self.widget.bbox(item) for name, item in shown.links.items()},
                    **self.where(shown))
            self._report_painted()
        return entry

    def _append(self, entry: ChatEntry) -> ChatEntry:
        """Paint `entry` below the last one, grouped with it if it may be."""
        entry.grouped = bool(self.entries) and self._groups_with(self.entries[-1], entry)
        self._paint(entry, self._y)
        self.entries.append(entry)
        self._by_tag[entry.tag] = entry
        self._y = entry.bottom
        return entry

    @staticmethod
    def _groups_with(before: ChatEntry, entry: ChatEntry) -> bool:
        """True if `entry` goes under `before`'s name and avatar: both a
        message or card, from one sender on the same side, within
        _GROUP_GAP_S (a divider or notice between them is `before`, and
        ends the run)."""
        if before.kind not in _GROUPED_KINDS or entry.kind not in _GROUPED_KINDS:
            return False

        def who(e: ChatEntry) -> tuple[str, bool]:
            if e.kind == "message":
                return id_key(e.data["from"]), bool(e.data["mine"])
            return id_key(e.data["user"]), e.data["direction"] == "send"

        first, then = before.data.get("ts"), entry.data.get("ts")
        return (who(before) == who(entry) and first is not None and then is not None
                and abs(then - first) < _GROUP_GAP_S)

    def update_file(self, key: tuple[str, int], **changes: Any) -> ChatEntry | None:
        """Change a file card (progress, status) and draw it again in place."""
        entry = self.files.get(key)
        if entry is None:
            return None
        return self.update(entry, "file_card", **changes)

    def update(self, entry: ChatEntry, what: str, **changes: Any) -> ChatEntry:
        """Change an entry's data and draw it again in place (`what` names
        it in the trace)."""
        entry.data.update(changes)
        if (entry.kind == "file" and entry.data.get("path") and entry.tag not in self._photos
                and entry.data["direction"] == "receive" and "picture" not in entry.data):
            entry.data["picture"] = False   # asked once; True if a thumbnail comes
            self._make_thumbnail(entry)
        self.widget.delete(entry.tag)
        bottom = entry.bottom
        self._paint(entry, entry.top)
        if entry.bottom != bottom:          # cards keep their height; if not, redo all
            self._relayout()
        if self.trace.enabled:
            self.trace(what, **{k: v for k, v in entry.data.items()
                                if isinstance(v, (str, int, float, bool))},
                       links={name: self.widget.bbox(item)
                              for name, item in entry.links.items()},
                       **self.where(entry))
            self._report_painted()
        return entry

    def _report_painted(self) -> None:
        """Trace: once Tk has drawn what is there now and the X server has
        it (update_idletasks ends with an XSync), say `painted`, so a test
        reads pixels after this record instead of sleeping."""
        def report() -> None:
            self._paint_report_job = None
            self.widget.update_idletasks()
            self.trace("painted", entries=len(self.entries))
        if self._paint_report_job is None:
            self._paint_report_job = self.widget.after_idle(report)

    def where(self, entry: ChatEntry) -> dict:
        """For the trace: the entry's text in canvas coordinates, and where
        canvas (0, 0) is on the screen now (it moves as the view scrolls)."""
        widget = self.widget
        return {"bbox": widget.bbox(entry.text_item) if entry.text_item else None,
                "origin": [widget.winfo_rootx() - round(widget.canvasx(0)),
                           widget.winfo_rooty() - round(widget.canvasy(0))]}

    # --- layout ---

    def _paint(self, entry: ChatEntry, top: int) -> None:
        entry.top = top
        entry.links.clear()
        entry.bottom = self.painters[entry.kind](self, entry, top) + self.look.px(10)

    def _forget(self, entry: ChatEntry) -> None:
        self.widget.delete(entry.tag)
        self._by_tag.pop(entry.tag, None)
        self._photos.pop(entry.tag, None)
        if entry.kind == "file":
            self.files.pop((entry.data["direction"], entry.data["transfer"]), None)

    def _set_scrollregion(self) -> None:
        top = self.entries[0].top - self._margin if self.entries else 0
        self.widget.configure(scrollregion=(0, top, self._width, self._y + self._margin))

    def _at_bottom(self) -> bool:
        return self.widget.yview()[1] >= 0.999

    def _on_configure(self, event: Any) -> None:
        if event.width != self._width:
            self._width = event.width
            if self._relayout_job is not None:
                self.widget.after_cancel(self._relayout_job)
            # Dragging a window's edge sends many of these: redraw once it rests.
            self._relayout_job = self.widget.after(_RELAYOUT_DELAY_MS, self._relayout)

    def _relayout(self) -> None:
        self._relayout_job = None
        follow = self._at_bottom()
        self.widget.delete("all")
        self._y = self._margin
        before = None
        for entry in self.entries:
            entry.grouped = before is not None and self._groups_with(before, entry)
            self._paint(entry, self._y)
            self._y = entry.bottom
            before = entry
        self._set_scrollregion()
        if follow:
            self.widget.yview_moveto(1.0)

    def find(self, query: str, after: ChatEntry | None) -> tuple[ChatEntry | None, int]:
        """The next entry older than `after` (None: from the newest) whose
        text or sender holds `query`, case-insensitively, going round to the
        newest after the oldest; and how many entries match in all."""
        needle = query.casefold()
        matches = [entry for entry in self.entries
                   if needle in str(entry.data.get("text", "")).casefold()
                   or needle in str(entry.data.get("from", entry.data.get("user", ""))).casefold()
                   or needle in str(entry.data.get("name", "")).casefold()]
        if not matches:
            return None, 0
        older = [entry for entry in matches if after is not None and entry.top < after.top]
        return (older or matches)[-1], len(matches)

    def highlight(self, entry: ChatEntry | None) -> None:
        """Frame `entry` and scroll it into the middle of the view (None:
        no frame)."""
        draw = self.widget
        draw.delete("found")
        if entry is None or not draw.find_withtag(entry.tag):
            return
        x1, y1, x2, y2 = draw.bbox(entry.tag)
        gap = self.look.px(4)
        draw.create_rectangle(x1 - gap, y1 - gap, x2 + gap, y2 + gap, tags="found",
                              outline=COLOURS["found"], width=self.look.px(2))
        top, bottom = float(self.entries[0].top - self._margin), float(self._y + self._margin)
        seen = draw.winfo_height()
        middle = (y1 + y2) / 2 - seen / 2
        draw.yview_moveto(max(0.0, (middle - top) / max(1.0, bottom - top)))
        if self.trace.enabled:
            self._report_painted()

    def redraw(self) -> None:
        """Draw every entry again (after a theme switch: new colours)."""
        self._relayout()
        if self.trace.enabled:
            self._report_painted()

    def close(self) -> None:
        """The window is going: a pending redraw must not find it gone."""
        for job in (self._relayout_job, self._paint_report_job, self._thumb_job):
            if job is not None:
                self.widget.after_cancel(job)
        self._relayout_job = self._paint_report_job = self._thumb_job = None
        if self._thumb_pool is not None:    # a decode under way ends by itself
            self._thumb_pool.shutdown(wait=False, cancel_futures=True)
            self._thumb_pool = None

    def _on_wheel(self, event: Any) -> None:
        if event.num == 4 or getattr(event, "delta", 0) > 0:
            self.widget.yview_scroll(-2, "units")
        else:
            self.widget.yview_scroll(2, "units")

    def _text_width(self) -> int:
        """How wide a bubble's text may be at the current window width."""
        px = self.look.px
        room = self._width - 2 * self._margin - 2 * (px(36) + px(10))
        return max(px(160), min(px(520), int(room * 0.78)))

    # --- links: wrapped by us, drawn over the text, opened in the browser ---

    def _wrap(self, text: str, width: int) -> tuple[str, list[int]]:
        """`text` broken into lines no wider than `width` pixels (at spaces,
        or inside a word too long for a line, as Tk does); returns the text
        with its line breaks, and for each of its characters the index in
        `text` it came from (-1: a break we made)."""
        measure = self.fonts["body"].measure
        shown: list[str] = []
        origin: list[int] = []
        line = ""
        for token in re.finditer(r"\n|[^\S\n]*[^\s]+|[^\S\n]+", text):
            piece, start = token.group(), token.start()
            if piece == "\n":
                line = ""
            elif line and measure(line + piece) > width:
                stripped = piece.lstrip()   # the space before the word ends this line
                for i in range(len(piece) - len(stripped)):
                    shown.append(piece[i])
                    origin.append(start + i)
                shown.append("\n")
                origin.append(-1)
                line = ""
                start += len(piece) - len(stripped)
                piece = stripped
            for i, char in enumerate(piece):
                if piece != "\n" and line and measure(line + char) > width:
                    shown.append("\n")
                    origin.append(-1)
                    line = ""
                shown.append(char)
                origin.append(start + i)
                line = "" if char == "\n" else line + char
        return "".join(shown), origin

    def _draw_links(self, entry: ChatEntry, links: list[tuple[int, int, str]], left: float,
                    top: float, fill: str, ink: str) -> None:
        """Each link of a message drawn over its text in `ink`, underlined,
        on the bubble's `fill`; a click opens it (see open_link)."""
        draw, tag, measure = self.widget, entry.tag, self.fonts["body"].measure
        assert entry.origin is not None
        line_height = self.fonts["body"].metrics("linespace")
        where = {source: shown for shown, source in enumerate(entry.origin) if source >= 0}
        starts = [0] + [i + 1 for i, char in enumerate(entry.shown_text) if char == "\n"]
        for number, (start, end, url) in enumerate(links):
            name = f"link{number}"
            entry.urls[name] = url
            first, last = where[start], where[end - 1] + 1
            for row, row_start in enumerate(starts):
                row_end = starts[row + 1] - 1 if row + 1 < len(starts) else len(entry.shown_text)
                a, b = max(first, row_start), min(last, row_end)
                if a >= b:
                    continue
                line = entry.shown_text[row_start:row_end]
                x = left + measure(line[:a - row_start])
                y = top + row * line_height
                part = line[a - row_start:b - row_start]
                draw.create_rectangle(x, y, x + measure(part), y + line_height, fill=fill,
                                      outline="", tags=(tag, f"{tag}-{name}", f"{tag}-under"))
                item = draw.create_text(x, y, anchor="nw", text=part, fill=ink,
                                        font=self.fonts["link"],
                                        tags=(tag, f"{tag}-{name}", f"{tag}-over"))
                entry.links.setdefault(name, item)
            draw.tag_bind(f"{tag}-{name}", "<ButtonRelease-1>",
                          lambda _e, u=url: self.open_link(u))
            draw.tag_bind(f"{tag}-{name}", "<Enter>",
                          lambda _e: self.widget.configure(cursor="hand2"))
            draw.tag_bind(f"{tag}-{name}", "<Leave>",
                          lambda _e: self.widget.configure(cursor=""))

    def open_link(self, url: str) -> None:
        """Open `url` in the browser, on a thread of its own (webbrowser may
        wait for the browser it starts). Only http and https: a link is
        never file:, javascript: or anything else."""
        if not re.match(r"https?://", url, re.IGNORECASE):
            return
        import webbrowser
        threading.Thread(target=webbrowser.open, args=(url,), name="browser",
                         daemon=True).start()
        self.trace("link_opened", url=url)

    # --- selecting and copying text ---

    def _entry_at(self, x: float, y: float) -> ChatEntry | None:
        """The entry drawn at canvas point (x, y), if any."""
        for item in reversed(self.widget.find_overlapping(x - 1, y - 1, x + 1, y + 1)):
            tags = self.widget.gettags(item)
            if "pill" in tags:
                return None                 # the pill covers what is below it
            for tag in tags:
                if tag in self._by_tag:
                    return self._by_tag[tag]
        return None

    def _link_at(self, entry: ChatEntry, x: float, y: float) -> str | None:
        """The URL of the link of `entry` drawn at canvas point (x, y)."""
        for item in self.widget.find_overlapping(x, y, x, y):
            for tag in self.widget.gettags(item):
                name = tag.removeprefix(entry.tag + "-")
                if name in entry.urls:
                    return entry.urls[name]
        return None

    def _light_links(self, entry: ChatEntry | None) -> None:
        """The links drawn over `entry`'s text take the selection's colours
        (they hide the text's own highlight); those of the last one lit
        take their own again. None: only the latter."""
        draw = self.widget
        if self._lit is not None:
            tag, under, over = self._lit
            draw.itemconfigure(f"{tag}-under", fill=under)
            draw.itemconfigure(f"{tag}-over", fill=over)
            self._lit = None
        if entry is not None and entry.urls:
            under = draw.find_withtag(f"{entry.tag}-under")
            over = draw.find_withtag(f"{entry.tag}-over")
            self._lit = (entry.tag, str(draw.itemcget(under[0], "fill")),
                         str(draw.itemcget(over[0], "fill")))
            draw.itemconfigure(f"{entry.tag}-under", fill=COLOURS["accent_soft"])
            draw.itemconfigure(f"{entry.tag}-over", fill=COLOURS["accent"])

    def _on_press(self, event: Any) -> None:
        self.widget.focus_set()             # so Ctrl+C comes here
        self._light_links(None)
        x, y = self.widget.canvasx(event.x), self.widget.canvasy(event.y)
        entry = self._entry_at(x, y)
        self._press = (entry, x, y) if entry is not None and entry.text_item else None
        self._dragged = False

    def _on_drag(self, event: Any) -> None:
        """Select from where the button went down to the pointer, inside one
        entry's text (a canvas selects within one text item)."""
        if self._press is None:
            return
        entry, x0, y0 = self._press
        x, y = self.widget.canvasx(event.x), self.widget.canvasy(event.y)
        if not self._dragged:
            self.widget.select_from(entry.text_item, f"@{round(x0)},{round(y0)}")
            self._dragged = True
        self.widget.select_to(entry.text_item, f"@{round(x)},{round(y)}")

    def _on_release(self, event: Any) -> None:
        """A click (no drag) on a bubble selects all its text; on a link, the
        link opens instead (its own binding)."""
        if self._press is None or self._dragged:
            return
        entry, x, y = self._press
        self._press = None
        if self._link_at(entry, x, y) is None:
            self.select(entry)

    def select(self, entry: ChatEntry) -> None:
        """Select all the text of `entry`."""
        self.widget.select_from(entry.text_item, 0)
        self.widget.select_to(entry.text_item, "end")
        self._light_links(entry)
        self.trace("selected", tag=entry.tag, text=self.selected_text())

    def selected_text(self) -> str:
        """The selected text, as it was written (line breaks we made for
        links taken out), or "" if nothing is selected."""
        draw = self.widget
        item = draw.select_item()
        entry = next((e for e in self.entries if e.text_item == item), None) if item else None
        if entry is None:
            return ""
        shown = str(draw.itemcget(item, "text"))
        # Tcl counts characters past U+FFFF twice (UTF-16); Python once.
        units = shown.encode("utf-16-le")
        first, last = int(draw.index(item, "sel.first")), int(draw.index(item, "sel.last"))
        start = len(units[:2 * first].decode("utf-16-le", "ignore"))
        end = len(units[:2 * (last + 1)].decode("utf-16-le", "ignore"))
        if entry.origin is None:
            return shown[start:end]
        return "".join(shown[i] for i in range(start, end) if entry.origin[i] >= 0)

    def copy(self, text: str | None = None) -> None:
        """Put `text` (by default what is selected) on the clipboard."""
        text = self.selected_text() if text is None else text
        if text:
            self.widget.clipboard_clear()
            self.widget.clipboard_append(text)
            self.trace("copied", text=text)

    def _on_menu(self, event: Any) -> None:
        """Right click: Copy (the selection, or the whole entry under the
        pointer), and on a link Copy link and Open link."""
        import tkinter
        x, y = self.widget.canvasx(event.x), self.widget.canvasy(event.y)
        entry = self._entry_at(x, y)
        if entry is None or not entry.text_item:
            return
        if self.widget.select_item() != entry.text_item:
            self.select(entry)
        url = self._link_at(entry, x, y)
        if self._menu is not None:
            self._menu.destroy()
        menu = self._menu = tkinter.Menu(self.widget, tearoff=0, font=self.fonts["body"],
                                         background=COLOURS["panel"],
                                         foreground=COLOURS["text"],
                                         activebackground=COLOURS["accent_soft"],
                                         activeforeground=COLOURS["text"], borderwidth=1,
                                         activeborderwidth=0)
        items = ["Copy"]
        menu.add_command(label="Copy", command=self.copy)
        if url is not None:
            items += ["Copy link", "Open link"]
            menu.add_command(label="Copy link", command=lambda: self.copy(url))
            menu.add_command(label="Open link", command=lambda: self.open_link(url))
        menu.tk_popup(event.x_root, event.y_root)
        if self.trace.enabled:
            menu.update_idletasks()
            self.trace("menu", items={label: [menu.winfo_rootx(),
                                              menu.winfo_rooty() + menu.yposition(i),
                                              menu.winfo_width(),
                                              (menu.yposition(i + 1) if i + 1 < len(items)
                                               else menu.winfo_height()) - menu.yposition(i)]
                                      for i, label in enumerate(items)})

    # --- pictures: thumbnails made on a worker thread ---

    def _make_thumbnail(self, entry: ChatEntry) -> None:
        """Start making `entry`'s thumbnail; _poll_thumbnails shows it."""
        if self._thumb_pool is None:
            self._thumb_pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="thumbnail")
        width, height = (self.look.px(side) for side in _THUMB_SIZE)
        self._thumbs.append((entry, self._thumb_pool.submit(
            picture_thumbnail, entry.data["path"], width, height)))
        if self._thumb_job is None:
            self._thumb_job = self.widget.after(_THUMB_POLL_MS, self._poll_thumbnails)

    def _poll_thumbnails(self) -> None:
        import tkinter
        self._thumb_job = None
        waiting = []
        for entry, future in self._thumbs:
            if not future.done():
                waiting.append((entry, future))
                continue
            try:
                made = future.result()
            except Exception:               # a bug in decoding: the plain card stays
                log.exception("thumbnail of %s", entry.data.get("path"))
                made = None
            if made is not None and self._by_tag.get(entry.tag) is entry:
                width, height, ppm = made
                photo = tkinter.PhotoImage(master=self.widget, width=width, height=height)
                photo.configure(data=ppm, format="ppm")
                self._photos[entry.tag] = photo
            if self._by_tag.get(entry.tag) is entry:
                self.update(entry, "thumbnail", picture=made is not None)
        self._thumbs = waiting
        if waiting:
            self._thumb_job = self.widget.after(_THUMB_POLL_MS, self._poll_thumbnails)

    # --- "↓ N new messages": what arrived below while you read above ---

    def _show_pill(self) -> None:
        self._draw_pill()
        if self.trace.enabled:
            x1, y1, x2, y2 = self.widget.bbox("pill")
            ox, oy = self.where(self.entries[-1])["origin"]
            self.trace("new_messages", count=self._unseen,
                       box=[x1 + ox, y1 + oy, x2 - x1, y2 - y1])
            self._report_painted()

    def _draw_pill(self) -> None:
        """The pill, a rounded button drawn on the canvas at the bottom of
        what the view shows now (so again after each scroll)."""
        draw, px = self.widget, self.look.px
        draw.delete("pill")
        if not self._unseen:
            return
        plural = "s" if self._unseen != 1 else ""
        bottom = draw.canvasy(int(draw.winfo_height())) - px(18)
        label = draw.create_text(self._width / 2, bottom, anchor="s", font=self.fonts["name"],
                                 text=f"↓ {self._unseen} new message{plural}",
                                 fill=COLOURS["mine_text"], tags="pill")
        x1, y1, x2, y2 = draw.bbox(label)
        self.box("pill", x1 - px(14), y1 - px(6), x2 + px(14), y2 + px(6), px(14),
                 COLOURS["accent"])
        draw.tag_raise(label)

    def to_bottom(self) -> None:
        """Jump to the newest entry (the pill goes as the view gets there)."""
        self.widget.yview_moveto(1.0)

    def _on_scrolled(self, scrollbar: str, first: str, last: str) -> None:
        if scrollbar:
            self.widget.tk.call(*self.widget.tk.splitlist(scrollbar), first, last)
        if not self._unseen:
            return
        if float(last) >= 0.999:
            self._unseen = 0
            self.widget.delete("pill")
            self.trace("new_messages", count=0, box=None)
        else:
            self._draw_pill()               # it stays at the bottom of the view

    # --- painters: each draws an entry from `top` down and returns its bottom ---

    def _head(self, entry: ChatEntry, top: int, user: str, ts: float | None,
              mine: bool) -> tuple[int, int]:
        """Avatar, name and time of a message or file card; returns the
        bubble's outer x (its left edge, or right edge for mine) and the y
        where it starts."""
        px, draw, tag = self.look.px, self.widget, entry.tag
        size, gap = px(36), px(10)
        x_avatar = self._width - self._margin - size if mine else self._margin
        edge = x_avatar - gap if mine else x_avatar + size + gap
        if entry.grouped:                   # under the name and avatar above
            return edge, top - px(7)
        anchor = "ne" if mine else "nw"
        self.avatar(tag, x_avatar, top, size, user)
        name = draw.create_text(edge, top, text=printable(user), anchor=anchor,
                                font=self.fonts["name"], fill=COLOURS["muted"], tags=tag)
        if ts is not None:
            x1, _, x2, _ = draw.bbox(name)
            draw.create_text(x1 - px(8) if mine else x2 + px(8), top, text=_clock(ts),
                             anchor=anchor, font=self.fonts["small"],
                             fill=COLOURS["faint"], tags=tag)
        return edge, draw.bbox(name)[3] + px(3)

    def _paint_message(self, entry: ChatEntry, top: int) -> int:
        px, draw, data = self.look.px, self.widget, entry.data
        mine = data["mine"]
        edge, y = self._head(entry, top, data["from"], data.get("ts"), mine)
        pad_x, pad_y = px(12), px(8)
        text = printable_block(data["text"])
        links = find_links(text)
        # Tk can't colour part of a text item, nor say where a character is
        # drawn: a text with links is wrapped here, so each link's place is
        # known and a link-coloured copy of it can be drawn over it.
        entry.shown_text, entry.origin = (self._wrap(text, self._text_width()) if links
                                          else (text, None))
        ink = COLOURS["mine_text"] if mine else COLOURS["text"]
        entry.text_item = draw.create_text(
            edge - pad_x if mine else edge + pad_x, y + pad_y,
            text=entry.shown_text, anchor="ne" if mine else "nw",
            width=0 if links else self._text_width(), font=self.fonts["body"],
            fill=ink, tags=(entry.tag, "text"))
        x1, y1, x2, y2 = draw.bbox(entry.text_item)
        state = data.get("state", "sent")
        fill = COLOURS["mine"] if mine else COLOURS["theirs"]
        if state != "sent":                 # ours, not (yet) confirmed by the host
            fill = COLOURS["mine_pending"] if state == "sending" else COLOURS["faint"]
        self.box((entry.tag, entry.tag + "-box"), x1 - pad_x, y1 - pad_y, x2 + pad_x,
                 y2 + pad_y, px(14), fill)
        draw.tag_lower(entry.tag + "-box", entry.text_item)
        if links:
            self._draw_links(entry, links, x1, y1, fill, ink if mine else COLOURS["accent"])
        mark = _MESSAGE_MARKS.get(state)
        if mark is not None:                # beside the bubble: its height never changes
            draw.create_text(x1 - pad_x - px(8), y2 + pad_y, anchor="se", text=mark,
                             font=self.fonts["small"], tags=entry.tag,
                             fill=COLOURS["error_text"] if state in ("unsent", "refused")
                             else COLOURS["muted"])
        return y2 + pad_y if entry.grouped else max(y2 + pad_y, top + px(36))

    _NOTICE_COLOURS: ClassVar[dict[str, tuple[str, str]]] = {
        "system": ("system", "system_text"), "info": ("info", "info_text"),
        "error": ("error", "error_text")}

    def _paint_notice(self, entry: ChatEntry, top: int) -> int:
        """A centred line: a host's [SYSTEM] notice or this program's note."""
        px, draw, data = self.look.px, self.widget, entry.data
        fill, ink = self._NOTICE_COLOURS[data["style"]]
        text = printable_block(data["text"])
        if data.get("ts") is not None:
            text += "   " + _clock(data["ts"])
        pad_x, pad_y = px(12), px(4)
        entry.text_item = draw.create_text(
            self._width / 2, top + pad_y, text=text, anchor="n", justify="center",
            width=self._width - 2 * self._margin - 2 * pad_x, font=self.fonts["small"],
            fill=COLOURS[ink], tags=entry.tag)
        x1, y1, x2, y2 = draw.bbox(entry.text_item)
        self.box((entry.tag, entry.tag + "-box"), x1 - pad_x, y1 - pad_y, x2 + pad_x,
                 y2 + pad_y, px(11), COLOURS[fill])
        draw.tag_lower(entry.tag + "-box", entry.text_item)
        return y2 + pad_y

    def _paint_divider(self, entry: ChatEntry, top: int) -> int:
        """"—— Earlier messages ——": where the history replay starts."""
        px, draw = self.look.px, self.widget
        entry.text_item = draw.create_text(self._width / 2, top, text=entry.data["text"],
                                           anchor="n", font=self.fonts["small"],
                                           fill=COLOURS["faint"], tags=entry.tag)
        x1, y1, x2, y2 = draw.bbox(entry.text_item)
        middle = (y1 + y2) // 2
        for start, end in ((self._margin, x1 - px(10)), (x2 + px(10),
                                                         self._width - self._margin)):
            if end > start:
                draw.create_line(start, middle, end, middle, fill=COLOURS["line"],
                                 tags=entry.tag)
        return y2

    def _paint_echo(self, entry: ChatEntry, top: int) -> int:
        """A command you typed (/CHECK bob), right-aligned and quiet: shown
        so the answer below it makes sense, never sent as chat."""
        draw = self.widget
        entry.text_item = draw.create_text(
            self._width - self._margin, top, text="› " + printable(entry.data["text"]),
            anchor="ne", width=self._text_width(), font=self.fonts["small"],
            fill=COLOURS["muted"], tags=entry.tag)
        return draw.bbox(entry.text_item)[3]

    def _paint_help(self, entry: ChatEntry, top: int) -> int:
        """The host's answer to `help`: a card on the left, to you alone."""
        px, draw = self.look.px, self.widget
        pad = px(14)
        x = self._margin
        width = min(self._width - 2 * self._margin, px(640))
        title = draw.create_text(x + pad, top + pad, anchor="nw",
                                 text="Help · only you see this", font=self.fonts["bold"],
                                 fill=COLOURS["accent"], tags=entry.tag)
        entry.text_item = draw.create_text(
            x + pad, draw.bbox(title)[3] + px(6), anchor="nw", width=width - 2 * pad,
            text=printable_block(entry.data["text"]), font=self.fonts["small"],
            fill=COLOURS["text"], tags=entry.tag)
        bottom = draw.bbox(entry.text_item)[3] + pad
        self.box((entry.tag, entry.tag + "-box"), x, top, x + width, bottom, px(14),
                 COLOURS["panel"])
        draw.tag_lower(entry.tag + "-box", title)
        return bottom

    def _paint_file(self, entry: ChatEntry, top: int) -> int:
        """A file on its way: who, the name and size, a progress bar, the
        state, and, once it is saved here, Open and Show in folder."""
        px, draw, data, tag = self.look.px, self.widget, entry.data, entry.tag
        mine = data["direction"] == "send"
        edge, card_y = self._head(entry, top, data["user"], data.get("ts"), mine)
        pad, width, icon_w, icon_h = px(12), px(300), px(34), px(42)
        x1 = edge - width if mine else edge
        x2 = x1 + width
        photo = self._photos.get(tag)       # a received picture's thumbnail, once made
        y = card_y + (int(photo.height()) + pad if photo is not None else 0)
        bottom = y + 2 * pad + icon_h + px(34)
        self.box(tag, x1, card_y, x2, bottom, px(14), COLOURS["theirs"])
        if photo is not None:               # a click on it opens the picture
            thumb = entry.links["thumb"] = draw.create_image(
                (x1 + x2) / 2, card_y + pad, anchor="n", image=photo, tags=(tag, f"{tag}-thumb"))
            draw.tag_bind(thumb, "<Button-1>",
                          lambda _e, path=data["path"]: self.post((_CHAT, "open"), path))
            draw.tag_bind(thumb, "<Enter>", lambda _e: self.widget.configure(cursor="hand2"))
            draw.tag_bind(thumb, "<Leave>", lambda _e: self.widget.configure(cursor=""))
        # The file's "icon": a tinted tile with its extension.
        self.box(tag, x1 + pad, y + pad, x1 + pad + icon_w, y + pad + icon_h, px(5),
                 COLOURS["accent_soft"])
        extension = os.path.splitext(data["name"])[1][1:5].upper() or "FILE"
        draw.create_text(x1 + pad + icon_w / 2, y + pad + icon_h / 2, text=extension,
                         font=self.fonts["label"], fill=COLOURS["accent"], tags=tag)
        text_x = x1 + pad + icon_w + px(10)
        entry.text_item = draw.create_text(
            text_x, y + pad + px(2), anchor="nw", font=self.fonts["bold"],
            fill=COLOURS["text"], tags=tag,
            text=self.elide(printable(data["name"]), "bold", x2 - pad - text_x))
        draw.create_text(text_x, y + pad + icon_h - px(2), anchor="sw", text=data["detail"],
                         font=self.fonts["small"], fill=COLOURS["muted"], tags=tag)
        # The progress bar, then one line of state (and links when saved).
        bar_y = y + pad + icon_h + px(10)
        bar_colour = {"failed": COLOURS["error_text"], "done": COLOURS["ok"]}.get(
            data["state"], COLOURS["accent"])
        draw.create_rectangle(x1 + pad, bar_y, x2 - pad, bar_y + px(5), fill=COLOURS["track"],
                              outline="", tags=tag)
        filled = (x2 - x1 - 2 * pad) * min(100.0, max(0.0, data["percent"])) / 100
        if filled >= 1:
            draw.create_rectangle(x1 + pad, bar_y, x1 + pad + filled, bar_y + px(5),
                                  fill=bar_colour, outline="", tags=tag)
        status_y = bar_y + px(13)
        status = draw.create_text(
            x1 + pad, status_y, anchor="nw", font=self.fonts["small"], tags=tag,
            fill=COLOURS["error_text"] if data["state"] == "failed" else COLOURS["muted"],
            text=self.elide(data["status"], "small", x2 - x1 - 2 * pad))
        links: tuple[tuple[str, str, Any], ...] = ()
        if data.get("path"):
            links = (("Show in folder", "folder", str(Path(data["path"]).parent)),
                     ("Open", "open", data["path"]))
        elif data["state"] == "asking":     # waits for the person's answer
            links = (("Decline", "file_decline", data["transfer"]),
                     ("Accept", "file_accept", data["transfer"]))
        elif data["state"] == "moving" or (mine and data["state"] == "done"
                                           and not data.get("settled")):
            links = (("Cancel", "file_cancel", (data["direction"], data["transfer"])),)
        if links:
            right = self._links(entry, x2 - pad, status_y, links)
            draw.itemconfigure(status, text=self.elide(data["status"], "small",
                                                      right - x1 - pad))
        return bottom

    def _links(self, entry: ChatEntry, right: int, y: int,
               links: Iterable[tuple[str, str, Any]]) -> int:
        """Clickable words, right-aligned at `right`, from the right: each
        posts ((_CHAT, action), value) when clicked. Returns where they start."""
        draw, tag = self.widget, entry.tag
        for label, action, value in links:
            link = entry.links[action] = draw.create_text(
                right, y, anchor="ne", text=label, font=self.fonts["name"],
                fill=COLOURS["accent"], tags=(tag, f"{tag}-{action}"))
            draw.tag_bind(f"{tag}-{action}", "<Button-1>",
                          lambda _e, a=action, v=value: self.post((_CHAT, a), v))
            draw.tag_bind(f"{tag}-{action}", "<Enter>",
                          lambda _e: self.widget.configure(cursor="hand2"))
            draw.tag_bind(f"{tag}-{action}", "<Leave>",
                          lambda _e: self.widget.configure(cursor=""))
            right = int(draw.bbox(link)[0]) - self.look.px(12)
        return right

    def _paint_call(self, entry: ChatEntry, top: int) -> int:
        """Someone calls you: who, and while it rings the time left with
        Call back and Decline; afterwards what became of it (a missed call
        stays visible)."""
        px, draw, data, tag = self.look.px, self.widget, entry.data, entry.tag
        edge, y = self._head(entry, top, data["user"], data.get("ts"), False)
        pad, width = px(12), px(320)
        x1, x2 = edge, edge + width
        bottom = y + 2 * pad + px(38)
        ringing = data["state"] == "ringing"
        self.box(tag, x1, y, x2, bottom, px(14),
                 COLOURS["accent_soft"] if ringing else COLOURS["theirs"])
        entry.text_item = draw.create_text(
            x1 + pad, y + pad, anchor="nw", font=self.fonts["bold"], tags=tag,
            fill=COLOURS["text"], text=self.elide(data["title"], "bold", x2 - x1 - 2 * pad))
        status_y = y + pad + px(22)
        right = x2 - pad
        if ringing:
            right = self._links(entry, right, status_y, (("Decline", "decline", data["user"]),
                                                         ("Call back", "callback", data["user"])))
        draw.create_text(x1 + pad, status_y, anchor="nw", font=self.fonts["small"], tags=tag,
                         fill=COLOURS["error_text"] if data["state"] == "missed"
                         else COLOURS["muted"],
                         text=self.elide(data["status"], "small", right - x1 - pad))
        return bottom

    def _paint_day(self, entry: ChatEntry, top: int) -> int:
        """A date divider: "Today", "Yesterday" or the date, said again at
        each redraw (a window open past midnight says "Yesterday" then)."""
        entry.data["text"] = day_label(entry.data["ts"])
        return self._paint_divider(entry, top + self.look.px(4))

    painters: ClassVar[dict[str, Callable]] = {
        "message": _paint_message, "notice": _paint_notice, "divider": _paint_divider,
        "echo": _paint_echo, "help": _paint_help, "file": _paint_file, "call": _paint_call,
        "day": _paint_day,
    }


# =============================================================================
# 25. GUI MEMBERS: the members list and the emoji picker
# =============================================================================
# Two small parts of the chat window beside the conversation. MemberList is
# the room's members on a canvas, where a click picks who a file goes to (it
# posts an event to the read loop, GUI APP); EmojiPicker is the button beside
# the message box whose grid of emoji types one at the cursor. Neither talks
# to the core.

# One code point each (no variation selectors or joiners: Tk 8.6 draws
# those as boxes), the ones people reach for first on a LAN chat.
PICKER_EMOJI = ("😀", "😂", "🤣", "😊", "🙂", "😍", "😘", "😎", "🤔", "😅", "😴", "😢",
                "😭", "😡", "😱", "🥳", "👍", "👎", "👏", "🙏", "💪", "👌", "👋", "🤝",
                "🎉", "🔥", "✨", "⭐", "💯", "✅", "❌", "❓", "☕", "🍺", "🍰", "🎂",
                "🌹", "🌞", "🌙", "⚡", "💡", "📎")


class EmojiPicker:
    """The small button beside the message box: a click opens a grid of
    emoji; picking one inserts it at the message box's cursor. Drawn in the
    window's font, as the bubbles draw them: the system's font fallback finds
    the emoji font (naming Noto Color Emoji itself made Xft draw its 109-pixel
    bitmaps unscaled)."""

    COLUMNS = 8

    def __init__(self, button: Any, field: Any, look: Look, trace: GuiTrace) -> None:
        import tkinter.font
        self.button = button
        self.field = field                  # the tk Entry (or Text) typed into
        self.trace = trace
        self.font = tkinter.font.Font(root=button, font=look.font(16))
        self.menu: Any = None
        button.configure(command=self.open)

    def open(self) -> None:
        import tkinter
        if self.menu is not None:
            self.menu.destroy()
        menu = self.menu = tkinter.Menu(self.button, tearoff=0, font=self.font,
                                        background=COLOURS["panel"],
                                        activebackground=COLOURS["accent_soft"],
                                        borderwidth=1, activeborderwidth=0)
        for index, emoji in enumerate(PICKER_EMOJI):
            menu.add_command(label=emoji, columnbreak=bool(index) and index % self.COLUMNS == 0,
                             command=functools.partial(self.insert, emoji))
        # Above the button, its right edge on the button's: the message box stays in view.
        menu.tk_popup(self.button.winfo_rootx() + self.button.winfo_width()
                      - menu.winfo_reqwidth(), self.button.winfo_rooty() - menu.winfo_reqheight())
        if self.trace.enabled:
            menu.update_idletasks()
            row = menu.yposition(1) - menu.yposition(0)
            self.trace("emoji_picker", items={
                emoji: [menu.winfo_rootx() + menu.xposition(i), menu.winfo_rooty()
                        + menu.yposition(i), self.font.measure(emoji), row]
                for i, emoji in enumerate(PICKER_EMOJI[:self.COLUMNS])})

    def insert(self, emoji: str) -> None:
        """`emoji` into the message box at its cursor, which stays after it."""
        self.field.insert("insert", emoji)
        self.field.focus_set()
        if self.trace.enabled:              # an Entry, or a Text for several lines
            self.trace("emoji_inserted", emoji=emoji, text=self.field.get(
                *(("1.0", "end-1c") if self.field.winfo_class() == "Text" else ())))
_YOU = "  (you)"                    # after your own name in the members list


class MemberList(Drawing):
    """The room's members with their avatars, "Everyone" first; a click
    picks a conversation: the room's, or a private one with that person
    (what you type and the files you send then go to them alone). A
    conversation with unread lines shows their count on its row."""

    def __init__(self, widget: Any, look: Look, images: Images, me: str,
                 post: Callable[[tuple, Any], None]) -> None:
        super().__init__(widget, look, images, COLOURS["panel"])
        self.me = me
        self.post = post
        self.members: list[str] = []        # in join order
        self.picked: str | None = None      # None = everyone
        self.unread: dict[str | None, int] = {}     # id_key(user) (None: room) -> lines
        self.labels: list[str] = []         # each row's text as last drawn (cut to fit)
        self._row = look.px(40)
        widget.configure(background=self.background, yscrollincrement=self._row)
        widget.bind("<Button-1>", self._on_click)
        widget.bind("<Configure>", lambda _e: self._paint())
        for sequence in ("<MouseWheel>", "<Button-4>", "<Button-5>"):
            widget.bind(sequence, self._on_wheel)

    def set(self, members: Iterable[str]) -> None:
        self.members = list(members)
        if self.picked is not None and not any(id_key(m) == id_key(self.picked)
                                               for m in self.members):
            self.picked = None
            self.post((_CHAT, "pick"), None)
        self._paint()

    def add(self, user: str) -> None:
        if not any(id_key(m) == id_key(user) for m in self.members):
            self.set(self.members + [user])

    def remove(self, user: str) -> None:
        self.set(m for m in self.members if id_key(m) != id_key(user))

    def pick(self, user: str | None) -> None:
        self.picked = user
        self._paint()

    def set_unread(self, counts: dict[str | None, int]) -> None:
        """Unread lines per conversation: id_key(user), or None for the room."""
        self.unread = dict(counts)
        self._paint()

    def _rows(self) -> list[tuple[str | None, str]]:
        rows: list[tuple[str | None, str]] = [(None, "Everyone in the room")]
        for member in self.members:
            rows.append((member, printable(member)))
        return rows

    def _label(self, user: str | None, name: str, width: int) -> str:
        """A row's text: the name cut to `width`, but "(you)" kept whole."""
        mine = user is not None and id_key(user) == id_key(self.me)
        return self.elide(name, "body", width, _YOU if mine else "")

    def _paint(self) -> None:
        px, draw = self.look.px, self.widget
        draw.delete("all")
        width = max(int(draw.winfo_width()), int(draw.cget("width")))
        size = px(28)
        self.labels = []
        for index, (user, name) in enumerate(self._rows()):
            top = index * self._row
            picked = (user is None and self.picked is None) or (
                user is not None and self.picked is not None
                and id_key(user) == id_key(self.picked))
            if picked:
                draw.create_rectangle(0, top, width, top + self._row,
                                      fill=COLOURS["accent_soft"], outline="")
            row = COLOURS["accent_soft"] if picked else COLOURS["panel"]
            y = top + (self._row - size) / 2
            if user is None:                # a grey of the avatars': white "All" reads on it
                self.avatar("row", px(10), y, size, "", AVATAR_COLOURS[-1], "All", row)
            else:
                self.avatar("row", px(10), y, size, user, background=row)
            unread = self.unread.get(None if user is None else id_key(user), 0)
            badge = 0
            if unread:                      # a pill at the row's right end
                count = "99+" if unread > 99 else str(unread)
                badge = max(px(20), self.fonts["name"].measure(count) + px(12))
                self.box("row", width - px(8) - badge, top + (self._row - px(20)) / 2,
                         width - px(8), top + (self._row + px(20)) / 2, px(10),
                         COLOURS["accent"])     # (a shown row has none: no blend)
                draw.create_text(width - px(8) - badge / 2, top + self._row / 2, text=count,
                                 font=self.fonts["name"], fill=COLOURS["mine_text"])
                badge += px(8)
            label = self._label(user, name, width - size - px(34) - badge)
            self.labels.append(label)
            draw.create_text(px(10) + size + px(10), top + self._row / 2, anchor="w",
                             text=label, font=self.fonts["body"], fill=COLOURS["text"])
        draw.configure(scrollregion=(0, 0, width, len(self._rows()) * self._row))

    def screen_rows(self) -> list[dict]:
        """For the trace: each row's user (None: everyone) and screen box."""
        draw = self.widget
        x, y = draw.winfo_rootx(), draw.winfo_rooty() - round(draw.canvasy(0))
        return [{"user": user, "box": [x, y + index * self._row, draw.winfo_width(),
                                       self._row], "label": label}
                for index, ((user, _name), label) in enumerate(zip(self._rows(), self.labels))]

    def _on_click(self, event: Any) -> None:
        index = int(self.widget.canvasy(event.y) // self._row)
        rows = self._rows()
        if 0 <= index < len(rows):
            user = rows[index][0]
            if user is not None and id_key(user) == id_key(self.me):
                user = None                 # a file to yourself: you mean the room
            self.post((_CHAT, "pick"), user)

    def _on_wheel(self, event: Any) -> None:
        self.widget.yview_scroll(-1 if event.num == 4 or getattr(event, "delta", 0) > 0
                                 else 1, "units")


# =============================================================================
# 26. GUI PANELS: the message box, help, search, notifications, dropped files
# =============================================================================
# The small parts around the conversation that the chat window (next
# section) builds on: the message box, the help panel (the host's answer
# to `help` as a table, in a window of its own rather than in the
# conversation), the search bar (Ctrl+F), desktop notifications (off the
# GUI thread, failing quietly), and files dropped on the window (tkdnd,
# when tkinterdnd2 is installed). None of them talks to the core: they
# post events to the read loop (GUI APP) like the canvases do.

INPUT_MAX_LINES = 5                 # the message box grows to this many lines, then scrolls


def _message_box(key: tuple, look: Look) -> Any:
    """The message box: a Text (so it can hold several lines) in a white
    box like _field's; ChatWindow binds its keys."""
    import PySimpleGUI as sg
    return sg.Column([[sg.Multiline("", key=key, size=(12, 1), no_scrollbar=True,
                                    border_width=0, expand_x=True, focus=True, rstrip=False,
                                    background_color=COLOURS["panel"],
                                    text_color=COLOURS["text"], font=look.font(10),
                                    pad=(look.px(8), look.px(7)))]],
                     background_color=COLOURS["panel"], expand_x=True,
                     pad=(0, (look.px(2), look.px(8))))



class MessageBox:
    """The keys of the message box (a Text): Enter sends, Shift+Enter
    starts a new line, the box grows with its lines (up to
    INPUT_MAX_LINES, then it scrolls); PageUp and PageDown scroll the
    conversation on screen (the canvas `shown()` gives); Tab leaves the
    box, as it left the old line."""

    def __init__(self, element: Any, shown: Callable[[], Any],
                 post: Callable[[tuple, Any], None], trace: GuiTrace) -> None:
        self.element = element
        self.trace = trace
        element.element_frame.configure(background=COLOURS["panel"])
        self.widget = box = element.Widget
        box.configure(height=1, wrap="word", undo=True, insertbackground=COLOURS["text"],
                      selectbackground=COLOURS["accent"], selectforeground=COLOURS["mine_text"])

        def send(_event: Any) -> str:
            post((_CHAT, "send"), None)
            return "break"

        def newline(_event: Any) -> str:
            box.insert("insert", "\n")
            box.see("insert")
            self.fit()
            return "break"

        def page(step: int) -> str:
            view = shown()                  # the conversation on screen
            view.yview_scroll(step, "pages")
            trace("scrolled", view=list(view.yview()))
            return "break"

        def leave(_event: Any) -> str:
            box.tk_focusNext().focus_set()
            return "break"
        for sequence in ("<Return>", "<KP_Enter>"):
            box.bind(sequence, send)
        for sequence in ("<Shift-Return>", "<Shift-KP_Enter>"):
            box.bind(sequence, newline)
        box.bind("<Prior>", lambda _e: page(-1))
        box.bind("<Next>", lambda _e: page(1))
        box.bind("<Tab>", leave)
        box.bind("<KeyRelease>", lambda _e: self.fit(), add="+")

    def fit(self) -> None:
        """As many rows as the text takes, 1 to INPUT_MAX_LINES."""
        counted = self.widget.count("1.0", "end-1c", "displaylines")
        lines = min(INPUT_MAX_LINES, 1 + (int(counted[0]) if counted else 0))
        if int(self.widget.cget("height")) != lines:
            self.widget.configure(height=lines)
            self.trace("message_box", lines=lines)

    def take(self) -> str:
        """What the box holds (a Text adds a last newline: not ours); empties it."""
        text = self.element.get().rstrip("\n")
        self.element.update("")
        self.fit()
        return text

    def restore(self, text: str) -> None:
        """A refused line comes back, unless something was typed since."""
        if not self.element.get().strip():
            self.element.update(text)
            self.fit()


# --- Search (Ctrl+F) ---------------------------------------------------------

class SearchBar:
    """Ctrl+F in the chat window: a field above the message box. Enter (or
    Next) finds the next older match of what is typed, case-insensitively,
    in the conversation's texts and names, scrolls to it and frames it;
    after the oldest it starts again from the newest. Escape (or x) closes
    it and gives the message box the focus back. Plain Tk widgets, packed
    (at the bottom) just above `above`; the read loop never sees them."""

    def __init__(self, above: Any, look: Look, view: Any, message_box: Any,
                 trace: GuiTrace) -> None:
        import tkinter
        self.view = view                    # the ChatView searched
        self.message_box = message_box      # the focus goes back there
        self.trace = trace
        self.above = above
        self.found: Any = None              # the ChatEntry framed now
        px = look.px
        font, bold = look.font(10), look.font(10, "bold")
        self.frame = frame = tkinter.Frame(above.master, background=COLOURS["window"])
        tkinter.Label(frame, text="Find", font=bold, background=COLOURS["window"],
                      foreground=COLOURS["muted"]).pack(side="left", padx=(0, px(8)))
        self.query = tkinter.StringVar(frame)
        self.entry = tkinter.Entry(frame, textvariable=self.query, font=font, relief="flat",
                                   background=COLOURS["panel"], foreground=COLOURS["text"],
                                   insertbackground=COLOURS["text"], highlightthickness=0,
                                   borderwidth=px(5), width=30)
        self.entry.pack(side="left", fill="x", expand=True)
        self.status = tkinter.Label(frame, text="", font=look.font(9),
                                    background=COLOURS["window"], foreground=COLOURS["muted"])
        for text, command in (("x", self.close), ("Next", self.next)):
            tkinter.Button(frame, text=text, command=command, font=bold, relief="flat",
                           background=COLOURS["accent_soft"], foreground=COLOURS["accent"],
                           activebackground=COLOURS["line"], activeforeground=COLOURS["accent"],
                           borderwidth=0, highlightthickness=0, padx=px(10), pady=px(3),
                           cursor="hand2").pack(side="right", padx=(px(6), 0))
        self.status.pack(side="right", padx=(px(8), 0))
        def key(action: Callable[[], None]) -> Callable[[Any], str]:
            def handler(_event: Any) -> str:
                action()
                return "break"
            return handler
        self.entry.bind("<Return>", key(self.next))
        self.entry.bind("<KP_Enter>", key(self.next))
        self.entry.bind("<Escape>", key(self.close))
        self.query.trace_add("write", lambda *_a: self._restart())
        # Said once the field has the keyboard: keys typed before that went
        # to the message box (a test failed so on a busy machine).
        self.entry.bind("<FocusIn>", lambda _e: self.trace("search", open=True))
        self._pad = (px(4), px(6))

    @property
    def shown(self) -> bool:
        return bool(self.frame.winfo_manager())

    def open(self) -> None:
        """Show the bar (or, shown, select what it holds) and focus it."""
        if not self.shown:
            self.frame.pack(side="bottom", fill="x", after=self.above, pady=self._pad)
        self.entry.focus_set()
        self.entry.select_range(0, "end")

    def close(self) -> None:
        self.frame.pack_forget()
        self.view.highlight(None)
        self.found = None
        self.message_box.focus_set()
        self.trace("search", open=False)

    def follow(self, view: Any) -> None:
        """Another conversation is on screen: search that one, from its
        newest line (the old one's frame goes)."""
        self.view.highlight(None)
        self.view = view
        self._restart()

    def _restart(self) -> None:
        """The query changed: the next Enter starts from the newest again."""
        self.found = None
        self.status.configure(text="")

    def next(self) -> None:
        query = self.query.get().strip()
        if not query:
            return
        entry, count = self.view.find(query, self.found)
        self.found = entry
        self.view.highlight(entry)
        self.status.configure(text="No match" if entry is None else
                              f"{count} match{'es' if count != 1 else ''}")
        self.trace("found", query=query, count=count,
                   text=None if entry is None else entry.data.get("text"),
                   **(self.view.where(entry) if entry is not None else {}),
                   frame=self.view.widget.bbox("found"), view=list(self.view.widget.yview()))


# --- Desktop notifications ---------------------------------------------------

NOTIFY_BODY_CHARS = 200             # a notification shows the start of a long message


def notification_command(title: str, body: str, platform: str | None = None,
                         which: Callable[[str], str | None] | None = None) -> list[str] | None:
    """The command that shows a desktop notification here, or None when
    there is none: notify-send (libnotify) on Linux and the BSDs, osascript
    on macOS, PowerShell's toast on Windows."""
    import shutil
    platform = platform or sys.platform
    which = which or shutil.which
    if platform == "darwin":
        if which("osascript") is None:
            return None
        def quoted(text: str) -> str:
            return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return ["osascript", "-e", f"display notification {quoted(body)} with title "
                f"{quoted(title)}"]
    if platform == "win32":
        shell = which("powershell")
        if shell is None:
            return None
        script = (  # a toast through the WinRT API PowerShell can reach; untested here
            "$t=[Windows.UI.Notifications.ToastNotificationManager,Windows.UI.Notifications,"
            "ContentType=WindowsRuntime]::GetTemplateContent(1);"
            "$x=$t.GetElementsByTagName('text');"
            "$x.Item(0).AppendChild($t.CreateTextNode($env:CHATROOM_TITLE))>$null;"
            "$x.Item(1).AppendChild($t.CreateTextNode($env:CHATROOM_BODY))>$null;"
            "[Windows.UI.Notifications.ToastNotificationManager]::CreateToastNotifier("
            "'chatroom').Show([Windows.UI.Notifications.ToastNotification]::new($t))")
        return [shell, "-NoProfile", "-NonInteractive", "-Command", script]
    if which("notify-send") is None:
        return None
    return ["notify-send", "--app-name=chatroom", "--", title, body]


def sound_button_text(sound: bool) -> str:
    """The sound toggle's label: what notifications do now."""
    return "Sound: on" if sound else "Sound: off"


# The sizes the chat window's "Ask" button goes through, and how each is
# written in settings.json.
ASK_CHOICES = ((0, "0"), (10 * 1024 ** 2, "10M"), (GUI_ASK_ABOVE, "100M"),
               (1024 ** 3, "1G"), (2 ** 63, "never"))


def ask_button_text(size: int) -> str:
    """The Ask button's label: which incoming files wait for Accept."""
    if size <= 0:
        return "Ask: every file"
    if size >= 2 ** 63:
        return "Ask: never"
    for unit, scale in (("GB", 1024 ** 3), ("MB", 1024 ** 2), ("KB", 1024)):
        if size >= scale:
            return f"Ask: over {size / scale:g} {unit}"
    return f"Ask: over {size} B"


def next_ask_choice(size: int) -> tuple[int, str]:
    """The Ask button's next choice after `size` (size, setting)."""
    for choice in ASK_CHOICES:
        if choice[0] > size:
            return choice
    return ASK_CHOICES[0]


class Notifier:
    """Desktop notifications, never blocking the GUI thread and never
    failing loudly: the command runs on a thread of its own, and a system
    with no notification service (no notify-send, no D-Bus session, as on
    a server) just shows none, logged once. `sound` rings the display's
    bell with each one (the "sound" setting; off by default)."""

    def __init__(self, trace: GuiTrace, sound: bool = False) -> None:
        self.trace = trace
        self.sound = sound
        self._warned = False

    def notify(self, root: Any, title: str, body: str) -> None:
        body = body if len(body) <= NOTIFY_BODY_CHARS else body[:NOTIFY_BODY_CHARS] + "..."
        command = notification_command(title, body)
        self.trace("notify", title=title, body=body, command=command is not None,
                   sound=self.sound)
        if self.sound:
            root.bell()
        if command is None:
            self._quiet("no notification command on this system")
            return
        threading.Thread(target=self._run, args=(command, title, body),
                         name="chatroom-notify", daemon=True).start()

    def _run(self, command: list[str], title: str, body: str) -> None:
        import subprocess  # here: only notifications run it, on this thread
        try:
            done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=10, check=False,
                                  env=dict(os.environ, CHATROOM_TITLE=title, CHATROOM_BODY=body))
        except (OSError, subprocess.SubprocessError) as exc:
            self._quiet(f"{command[0]}: {exc}")
            return
        if done.returncode:
            self._quiet(f"{command[0]} exited {done.returncode}: "
                        f"{done.stderr.decode('utf-8', 'replace').strip()[:200]}")

    def _quiet(self, why: str) -> None:
        """Say once, in the log, why no notification shows."""
        if not self._warned:
            self._warned = True
            log.info("desktop notifications are off: %s", why)


# --- Files dropped on the window ---------------------------------------------

def accept_file_drops(window: Any, post: Callable[[tuple, Any], None], trace: GuiTrace) -> bool:
    """Let files be dropped anywhere on `window` (a Tk toplevel): each drop
    posts ((_CHAT, "drop"), [paths]). Uses tkdnd, which tkinterdnd2 ships
    for Linux, Windows and macOS, loaded into PySimpleGUI's own Tcl
    interpreter. False (logged) without the package or when tkdnd won't
    load; the window works on, with Send file and /send."""
    import tkinter
    try:
        from tkinterdnd2 import TkinterDnD  # optional: pip install tkinterdnd2
    except ImportError:
        log.info("no tkinterdnd2: files can't be dropped on the window")
        return False
    try:
        TkinterDnD._require(window)         # package require tkdnd, from the wheel
        tk = window.tk

        def dropped(data: str) -> str:
            post((_CHAT, "drop"), list(tk.splitlist(data)))
            return "copy"
        command = window.register(dropped)
        # tkdnd looks up from the widget under the pointer to the first one
        # registered: registering the toplevel takes drops on all of it.
        tk.call("tkdnd::drop_target", "register", window, "DND_Files")
        tk.call("bind", window, "<<Drop:DND_Files>>", f"{command} %D")
    except (RuntimeError, tkinter.TclError) as exc:
        log.info("files can't be dropped on the window: %s", exc)
        return False
    trace("drops", window=str(window), interp=str(window.tk.call("tk", "appname")))
    return True


# --- The help panel ----------------------------------------------------------

_HELP_ITEM = re.compile(r"^\s*(\d+(?:\.\d+)*)\.?\s+(.*)$")
_HELP_COMMAND = re.compile(r"(?<![\w/])/[A-Za-z]+|\bhelp\b")


def help_rows(text: str) -> list[tuple[str, str, str]]:
    """The host's help text as table rows (number, title, text): "1. Text
    chat: type..." -> ("1", "Text chat", "type..."), "2.1 Type..." ->
    ("2.1", "", "Type..."). Lines that continue an item join it (the host
    wraps at 75 columns; the panel wraps to its own width). A line before
    the first number (the "HELP" heading) is dropped; text with no
    numbered line at all becomes one row, so nothing is ever lost."""
    rows: list[list[str]] = []
    for line in text.splitlines():
        item = _HELP_ITEM.match(line)
        if item:
            number, rest = item.groups()
            title = ""
            if "." not in number:           # a top-level item: "Title: what it does"
                head, colon, tail = rest.partition(":")
                if colon and len(head) <= 40:
                    title, rest = head.strip(), tail.strip()
            rows.append([number, title, rest])
        elif rows and line.strip():
            rows[-1][2] = (rows[-1][2] + " " + line.strip()).strip()
    if not rows:
        return [("", "", " ".join(text.split()))]
    return [(number, title, body) for number, title, body in rows]


class HelpPanel:
    """The answer to `help`, in a window of its own beside the chat: the
    numbered items as a table (number, then the title in bold and the text
    wrapped under it), commands in the accent colour. Escape or Close
    shuts it; a new `help` refreshes it. A plain Tk Toplevel of the chat
    window, which the read loop never sees: it closes with its window."""

    def __init__(self, parent: Any, look: Look, text: str, trace: GuiTrace) -> None:
        import tkinter
        import tkinter.font
        self.trace = trace
        px = look.px
        top = tkinter.Toplevel(parent, background=COLOURS["panel"])
        self.window: Any = top              # None once closed
        top.title("Help · chatroom")
        top.transient(parent)
        self.source = text                  # the host's text, to draw it again
        self.rows = help_rows(text)
        body = tkinter.font.Font(root=top, font=look.font(10))
        bold = tkinter.font.Font(root=top, font=look.font(10, "bold"))
        indent = px(44)
        # As tall as the chat window allows (it scrolls beyond), never past it.
        room = max(body.metrics("linespace") * 6, parent.winfo_height() - px(150))
        self.text = view = tkinter.Text(
            top, wrap="word", width=70, height=room // (body.metrics("linespace") + px(4)),
            background=COLOURS["panel"], foreground=COLOURS["text"], font=body,
            relief="flat", borderwidth=0, highlightthickness=0, padx=px(18), pady=px(14),
            spacing1=px(2), spacing3=px(4), tabs=(indent,), cursor="arrow")
        view.tag_configure("row", lmargin1=0, lmargin2=indent)
        view.tag_configure("section", spacing1=px(10))
        view.tag_configure("number", foreground=COLOURS["muted"], font=bold)
        view.tag_configure("title", font=bold)
        view.tag_configure("command", foreground=COLOURS["accent"], font=bold)
        view.insert("end", "Help · only you see this\n", ("title",))
        for number, title, words in self.rows:
            tags: tuple[str, ...] = ("row",) if "." in number else ("row", "section")
            view.insert("end", number + "\t", tags + ("number",))
            if title:
                view.insert("end", title + "\n", tags + ("title",))
                if not words:
                    continue
                tags = ("row",)
                view.insert("end", "\t", tags)
            start = view.index("end-1c")
            view.insert("end", words + "\n", tags)
            for match in _HELP_COMMAND.finditer(words):
                view.tag_add("command", f"{start}+{match.start()}c", f"{start}+{match.end()}c")
        view.configure(state="disabled")
        close = tkinter.Button(top, text="Close", command=self.close, relief="flat",
                               background=COLOURS["accent"], foreground=COLOURS["mine_text"],
                               activebackground=COLOURS["accent_dark"],
                               activeforeground=COLOURS["mine_text"], font=bold,
                               padx=px(14), pady=px(5), borderwidth=0, highlightthickness=0,
                               cursor="hand2")
        close.pack(side="bottom", anchor="e", padx=px(14), pady=(px(6), px(12)))
        bar = tkinter.Scrollbar(top, orient="vertical", command=view.yview, width=px(10),
                                relief="flat", borderwidth=0, highlightthickness=0,
                                troughcolor=COLOURS["panel"], background=COLOURS["line"],
                                activebackground=COLOURS["faint"], elementborderwidth=0)
        view.configure(yscrollcommand=bar.set)
        bar.pack(side="right", fill="y")
        view.pack(side="top", fill="both", expand=True)
        top.bind("<Escape>", lambda _e: self.close())
        top.protocol("WM_DELETE_WINDOW", self.close)
        top.update_idletasks()
        x = parent.winfo_rootx() + max(0, (parent.winfo_width() - top.winfo_reqwidth()) // 2)
        top.geometry(f"+{x}+{parent.winfo_rooty() + px(40)}")
        if trace.enabled:                   # said once it has the keyboard (Escape works)
            view.bind("<FocusIn>", lambda _e: self._report(), add="+")
        view.focus_set()

    def _report(self) -> None:
        top = self.window
        if top is None or getattr(self, "_reported", False):
            return
        self._reported = True
        top.update_idletasks()
        self.trace("help_panel", open=True, rows=self.rows, xid=int(top.wm_frame(), 16),
                   box=[top.winfo_rootx(), top.winfo_rooty(), top.winfo_width(),
                        top.winfo_height()])

    def close(self) -> None:
        if self.window is not None:
            self.window.destroy()
            self.window = None
            self.trace("help_panel", open=False)

    @property
    def open(self) -> bool:
        return self.window is not None and bool(self.window.winfo_exists())


# =============================================================================
# 27. GUI WINDOWS: widgets shared by the windows, and the launcher
# =============================================================================
# The first window a person sees, built from GUI LOOK and GUI CONVERSATION:
# the launcher (hosts on the LAN, the address and the IDs, Join, "Host a
# room here"), and the widgets every window uses. A window shows what the
# app (GUI APP) tells it and reports what was clicked; it never calls the
# core, and it checks only what can be checked here (an ID's shape),
# leaving the last word to the host.

# --- Widgets shared by the windows -------------------------------------------

def _field(key: tuple, look: Look, default: str = "", **options: Any) -> Any:
    """An input inside a white box: tk entries have no inner padding, so the
    box gives them room to breathe. It asks for less width than the
    window gives it (three in a row fit a small screen), but more than the
    launcher's labels over it, so those three share the row evenly."""
    import PySimpleGUI as sg
    return sg.Column([[sg.Input(default, key=key, border_width=0, expand_x=True, size=(20, 1),
                                background_color=COLOURS["panel"],
                                disabled_readonly_background_color=COLOURS["panel"],
                                disabled_readonly_text_color=COLOURS["faint"],
                                pad=(look.px(8), look.px(7)), **options)]],
                     background_color=COLOURS["panel"], expand_x=True,
                     pad=(0, (look.px(2), look.px(8))))


def _label(text: str, look: Look, **options: Any) -> Any:
    import PySimpleGUI as sg
    return sg.Text(text, font=look.font(9, "bold"), text_color=COLOURS["muted"],
                   pad=(0, 0), **options)


def _button(text: str, key: tuple, look: Look, primary: bool = True, **options: Any) -> Any:
    import PySimpleGUI as sg
    colours = ((COLOURS["mine_text"], COLOURS["accent"]) if primary
               else (COLOURS["accent"], COLOURS["accent_soft"]))
    return sg.Button(text, key=key, button_color=colours, border_width=0,
                     font=look.font(10, "bold"), **options)


def _polish_buttons(window: Any, look: Look) -> None:
    """What PySimpleGUI doesn't expose for tk buttons: inner padding, a
    hover colour, a hand cursor, no focus ring."""
    import PySimpleGUI as sg
    for element in window.element_list():
        if isinstance(element, sg.Button) and element.Widget is not None:
            foreground, background = element.ButtonColor
            primary = background == COLOURS["accent"]
            hover = COLOURS["accent_dark"] if primary else COLOURS["line"]
            element.Widget.configure(padx=look.px(14), pady=look.px(7), relief="flat",
                                     cursor="hand2", highlightthickness=0,
                                     activebackground=hover, activeforeground=foreground,
                                     disabledforeground=COLOURS["faint"])


def _close_button_posts(window: Any) -> None:
    """The window manager's close button, queued as a
    WINDOW_CLOSE_ATTEMPTED_EVENT like a thread's event. PySimpleGUI, with
    several windows open, reports that button as an event of None and then
    hands out, in its place, any event the core had queued for the same
    window: a close at that moment was lost. A queued event can't be."""
    import PySimpleGUI as sg
    window.TKroot.protocol("WM_DELETE_WINDOW", lambda: window.write_event_value(
        sg.WINDOW_CLOSE_ATTEMPTED_EVENT, None))


def _fit_on_screen(window: Any, minimum: tuple[int, int], preferred: tuple[int, int]) -> None:
    """Size `window` as `preferred`, centred, but never bigger than its
    screen (a window taller than the screen hides its bottom, where the
    message box is) nor smaller than `minimum` (itself no bigger than the
    screen). Its elements ask for little, and the window grows them."""
    root = window.TKroot
    root.update_idletasks()
    screen_w, screen_h = root.winfo_screenwidth(), root.winfo_screenheight()
    room_w, room_h = int(screen_w * _SCREEN_SHARE), int(screen_h * _SCREEN_SHARE)
    least_w, least_h = min(minimum[0], room_w), min(minimum[1], room_h)
    window.set_min_size((least_w, least_h))
    width = min(max(preferred[0], least_w, root.winfo_reqwidth()), room_w)
    height = min(max(preferred[1], least_h, root.winfo_reqheight()), room_h)
    root.geometry(f"{width}x{height}+{(screen_w - width) // 2}+{(screen_h - height) // 2}")


_SCREEN_SHARE = 0.95                # a window takes at most this much of the screen


def _screen_box(widget: Any) -> list[int]:
    """[x, y, width, height] of a widget on the screen (for the trace)."""
    return [widget.winfo_rootx(), widget.winfo_rooty(), widget.winfo_width(),
            widget.winfo_height()]


# --- The launcher ------------------------------------------------------------

_LAUNCHER_LEAST_LIST_PX = 100      # the hosts list at the smallest: headings, two rows
_LAUNCHER_WIDTH_PX = 1156          # the launcher's width, where the screen has room
_STATUS_MOST_CHARS = 720           # about 5 lines: the firewall hint fits, with room to spare
_TOOLTIP_LINE_CHARS = 80           # tooltips don't wrap: we do


def _inside(widget: Any, ancestor: Any) -> bool:
    """Whether `widget` is `ancestor` or inside it."""
    return str(widget) == str(ancestor) or str(widget).startswith(str(ancestor) + ".")


def _wrapped(text: str, width: int) -> str:
    """`text` in lines of at most `width` characters, broken between words
    (a word longer than that gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "\n".join(lines)


class Launcher:
    """The first window: hosts found on the LAN (live), an address field,
    the Room and User IDs, Join and "Host a room here". Problems show in
    red under the fields; the window stays.

    It also receives every core event (see GuiBridge), so it lives until
    the program ends: hidden while you chat, shown again when you leave.
    """

    def __init__(self, look: Look, images: Images, prefill: dict[str, str],
                 trace: GuiTrace) -> None:
        import PySimpleGUI as sg
        self.look = look
        self.trace = trace
        self.hosts: list[dict] = []         # `host` events
        self.rows: list[tuple[dict, dict | None]] = []  # (host, room or None: a new room)
        self.changed_key: dict | None = None    # the host_key_changed error shown
        px = look.px
        table = sg.Table(
            values=[], headings=["Room", "People", "Host", "Address", "Key"],
            key=(_ROOM, "hosts"), col_widths=[16, 7, 13, 14, 11], auto_size_columns=False,
            num_rows=7,
            justification="left", enable_events=True, expand_x=True, select_mode="browse",
            row_height=px(30), font=look.font(10), background_color=COLOURS["panel"],
            text_color=COLOURS["text"], header_background_color=COLOURS["window"],
            header_text_color=COLOURS["muted"], header_font=look.font(9, "bold"),
            header_relief="flat", header_border_width=0, border_width=0,
            selected_row_colors=(COLOURS["mine_text"], COLOURS["accent"]),
            hide_vertical_scroll=True, pad=(0, (px(6), px(4))), expand_y=True)
        ids = sg.Column([[
            sg.Column([[_label("ROOM ID", look)], [_field((_ROOM, "room"), look,
                                                          prefill.get("room", ""))]],
                      expand_x=True, pad=((0, px(8)), 0)),
            sg.Column([[_label("USER ID", look)], [_field((_ROOM, "user"), look,
                                                          prefill.get("user", ""))]],
                      expand_x=True, pad=((px(8), px(8)), 0)),
            # Masked; a room with one asks for it, a new room gets it. Never saved.
            sg.Column([[_label("PASSWORD  (optional)", look)],
                       [_field((_ROOM, "password"), look, prefill.get("password", ""),
                               password_char="\u2022")]],
                      expand_x=True, pad=((px(8), 0), 0))]], expand_x=True, pad=0)
        layout = [
            [sg.Image(data=images.icon(px(44)), pad=((0, px(10)), 0)),
             sg.Column([[sg.Text("chatroom", font=look.font(18, "bold"),
                                 text_color=COLOURS["accent"], pad=0)],
                        [sg.Text("Chat with the people on your network.",
                                 text_color=COLOURS["muted"], pad=0)]], pad=0),
             sg.Push(), _button(theme_button_text(), (_ROOM, "theme"), look,
                                primary=False)],
            [sg.Text("HOSTS ON YOUR NETWORK", font=look.font(9, "bold"),
                     text_color=COLOURS["muted"], pad=(0, (px(16), 0)))],
            [table],
            [sg.Text("Looking for hosts...", key=(_ROOM, "hint"), font=look.font(9),
                     text_color=COLOURS["muted"], pad=0, expand_x=True)],
            [sg.Text("", key=(_ROOM, "key"), font=look.font(9), text_color=COLOURS["muted"],
                     pad=(0, (0, px(12))), expand_x=True)],
            [_label("ADDRESS  (pick a host above, or type host or host:port)", look)],
            [_field((_ROOM, "address"), look, prefill.get("address", ""))],
            [ids],
            # Wrapped to the window's width (see _wrap_status): a long error
            # must not widen the window and move Join from under the pointer.
            [sg.Text("", key=(_ROOM, "status"), font=look.font(10), expand_x=True,
                     text_color=COLOURS["error_text"], pad=(0, (px(2), px(8))))],
            # Shown only when a host's key changed: accepting it is a deliberate click.
            [sg.pin(sg.Column([[
                sg.Text("", key=(_ROOM, "key_text"), font=look.font(10), size=(44, 5),
                        text_color=COLOURS["error_text"], background_color=COLOURS["error"],
                        pad=(px(10), px(8))),
                sg.Push(background_color=COLOURS["error"]),
                _button("Accept the new key", (_ROOM, "accept_key"), look,
                        pad=(px(10), px(8)))]], key=(_ROOM, "key_box"), visible=False,
                background_color=COLOURS["error"], expand_x=True, pad=(0, (0, px(10)))),
                expand_x=True)],
            [_button("Host a room here", (_ROOM, "host"), look, primary=False), sg.Push(),
             _button("Join", (_ROOM, "join"), look, bind_return_key=True)],
        ]
        self.window = sg.Window("chatroom", layout, finalize=True,
                                enable_close_attempted_event=True, resizable=True,
                                icon=images.icon(64), font=look.font(10))
        _polish_buttons(self.window, look)
        _close_button_posts(self.window)
        table = self.window[(_ROOM, "hosts")]
        for column in table.Widget["columns"]:  # headings over their column's text
            table.Widget.heading(column, anchor="w")
        table.ttk_style.configure(table.table_ttk_style_name + ".Heading",
                                  padding=(look.px(3), look.px(2)))
        self.window[(_ROOM, "hosts")].bind("<Double-Button-1>", "double")
        self._fit()

    def _fit(self) -> None:
        """Size the window for its screen, with Join always on it. The rows
        under the list are packed from the bottom before the list, and Join
        and the theme button from the right, so Tk gives what is left to
        the list: a short screen, a long error or the changed-key box
        shrink the list, never move Join (a review found the launcher 991 px
        tall at --scale 1.5 on a 980 px screen, and Join off a 1280x720 one)."""
        root, px = self.window.TKroot, self.look.px
        status = self.window[(_ROOM, "status")].Widget
        status.configure(width=0, height=0, wraplength=px(300))    # see _wrap_status
        status.bind("<Configure>", lambda event: self._wrap_status(event.width), add="+")
        rows = root.pack_slaves()
        table = next(row for row in rows if _inside(self.window[(_ROOM, "hosts")].Widget, row))
        for row in reversed(rows[rows.index(table) + 1:]):
            row.pack_configure(side="bottom", before=table)
        host, join = self.window[(_ROOM, "host")].Widget, self.window[(_ROOM, "join")].Widget
        join.pack_configure(side="right", before=host)
        theme = self.window[(_ROOM, "theme")].Widget
        theme.pack_configure(side="right", before=theme.master.pack_slaves()[0])
        root.update_idletasks()
        asked_w, asked_h = root.winfo_reqwidth(), root.winfo_reqheight()
        # At least the list's headings and two rows of it.
        least_h = asked_h - table.winfo_reqheight() + px(_LAUNCHER_LEAST_LIST_PX)
        _fit_on_screen(self.window, (asked_w, least_h), (px(_LAUNCHER_WIDTH_PX), asked_h))
        root.update_idletasks()
        self._wrap_status(status.winfo_width())

    def _wrap_status(self, width: int) -> None:
        """The status line is `width` wide (it fills the window's width):
        wrap its text there, in as many lines as it takes (the list makes
        room, see _fit). Called again each time that width changes."""
        label = self.window[(_ROOM, "status")].Widget

        def pixels(option: str) -> int:     # cget gives Tcl objects: "1", "2m"...
            return int(label.winfo_pixels(str(label.cget(option))))

        wrap = width - 2 * (pixels("padx") + pixels("borderwidth") + pixels("highlightthickness"))
        if wrap > 0 and pixels("wraplength") != wrap:
            label.configure(wraplength=wrap)

    # --- the hosts found ---

    def show_hosts(self, event: dict) -> None:
        """Refresh the list from a `hosts` event: a row per room of each
        host (room, people, host, address), then one to start a new room
        there. What was picked stays picked if it is still listed."""
        picked = self.picked_row()
        self.hosts = hosts = event["hosts"]
        self.rows = [(host, room) for host in hosts
                     for room in ([*host["rooms"], None] if host.get("alive", True) else [None])]
        table = self.window[(_ROOM, "hosts")]
        table.update(values=[_row_text(host, room) for host, room in self.rows],
                     row_colors=[(index, COLOURS["faint"], COLOURS["panel"]) if not
                                 host.get("alive", True) else (index, COLOURS["text"],
                                                               COLOURS["panel"])
                                 for index, (host, _room) in enumerate(self.rows)])
        if picked is not None and picked in self._row_keys():
            table.update(select_rows=[self._row_keys().index(picked)])
        self.window[(_ROOM, "hint")].update(
            f"{len(hosts)} host{'s' if len(hosts) != 1 else ''} found. Pick a room (double-"
            'click joins it), or start one with "Host a room here".' if hosts else
            'No host found yet. Still looking... or start one with "Host a room here".')
        self.trace_layout()

    def _row_keys(self) -> list[tuple]:
        return [(host["address"], host["port"], room["room"] if room else None)
                for host, room in self.rows]

    def picked_row(self) -> tuple | None:
        selected = self.window[(_ROOM, "hosts")].SelectedRows
        return self._row_keys()[selected[0]] if selected and selected[0] < len(self.rows) \
            else None

    def use_row(self, index: int) -> None:
        """A row was picked: the host's address goes in the field, and the
        room in Room ID (the new-room row empties it, for a name of yours).
        An error about an earlier attempt goes."""
        if not 0 <= index < len(self.rows):
            return
        host, room = self.rows[index]
        self.window[(_ROOM, "address")].update(address_text(host["address"], host["port"]))
        self.window[(_ROOM, "room")].update(room["room"] if room else "")
        if room is None:
            self.window[(_ROOM, "room")].set_focus()
        self.status("")
        self.window[(_ROOM, "key")].update(
            f"Key of {printable(host['name'])}: {show_fingerprint(host['fingerprint'])} "
            "(the host shows it: they must match)" if host.get("fingerprint") else
            f"{printable(host['name'])} does not encrypt: it runs with --insecure")
        self.trace_layout()

    def key_changed(self, event: dict | None) -> None:
        """Show (or, None, hide) why a host's key was refused, with the
        button that accepts the new key."""
        self.changed_key = event
        if event is not None:
            self.window[(_ROOM, "key_text")].update(
                f"This host's key has changed. It was {show_fingerprint(event['old_fingerprint'])}"
                f" and is now {show_fingerprint(event['fingerprint'])}. Someone may be "
                "pretending to be it. Accept only if the host shows the new key.")
        self.window[(_ROOM, "key_box")].update(visible=event is not None)
        self.trace("key_changed", shown=event is not None)
        self.trace_layout()

    # --- the form ---

    def field(self, name: str) -> str:
        return self.window[(_ROOM, name)].get().strip()

    def form(self) -> tuple[list[str], int, str, str, str] | None:
        """(addresses, port, room, user, password) from the fields, or None after
        showing what is wrong: the address typed, or every address of the
        host it names in the list. Checks what can be checked here; the
        host has the last word (a taken ID, a full room)."""
        ids = self.ids()
        if ids is None:
            return None
        address = self.field("address")
        if not address and len(self.hosts) == 1:
            address = address_text(self.hosts[0]["address"], self.hosts[0]["port"])
        if not address:
            self.error("Pick a host in the list, or type its address.")
            return None
        try:
            host, port = parse_server(address)
        except ValueError as exc:
            self.error(f"Address: {exc}.")
            return None
        listed = next((h.get("addresses") or [h["address"]] for h in self.hosts
                       if h["address"] == host and h["port"] == port), [host])
        return (listed, port) + ids + (self.password(),)

    def password(self) -> str:
        """The password field, as typed ("" = none): spaces count."""
        return self.window[(_ROOM, "password")].get()

    def ids(self) -> tuple[str, str] | None:
        """(room, user) if both look valid, else None after saying why."""
        checked = []
        for kind, label in (("room", "Room ID"), ("user", "User ID")):
            raw = self.field(kind)
            if not raw:
                self.error(f"Type a {label}.")
                return None
            try:
                checked.append(check_id(raw, kind))
            except Refused as refusal:
                self.error(f"{label}: {refusal.message}.")
                return None
        if imitates_system(checked[1]):
            self.error("User ID: SYSTEM, and names that look like it, are kept for "
                       "the host's notices.")
            return None
        return checked[0], checked[1]

    def recolour(self) -> None:
        """After a theme switch (recolour_widgets did the plain widgets):
        the host table's ttk style, its rows, the toggle's label."""
        table = self.window[(_ROOM, "hosts")]
        table.ttk_style.configure(table.table_ttk_style_name, background=COLOURS["panel"],
                                  fieldbackground=COLOURS["panel"],
                                  foreground=COLOURS["text"])
        table.ttk_style.configure(table.table_ttk_style_name + ".Heading",
                                  background=COLOURS["window"], foreground=COLOURS["muted"])
        table.ttk_style.map(table.table_ttk_style_name, foreground=[
            ("selected", COLOURS["mine_text"])], background=[("selected", COLOURS["accent"])])
        if self.hosts:
            self.show_hosts({"hosts": self.hosts})
        self.window[(_ROOM, "theme")].update(theme_button_text())

    def error(self, text: str) -> None:
        self._status(text, True)

    def status(self, text: str) -> None:
        self._status(text, False)

    def _status(self, text: str, error: bool) -> None:
        """Show `text` under the fields, in red if an `error`: whole, in as
        many lines as it takes at the window's width (see _fit), unless it
        is longer than _STATUS_MOST_CHARS (a host's message can be): then
        cut with "…", and whole in the tooltip."""
        element = self.window[(_ROOM, "status")]
        shown = text if len(text) <= _STATUS_MOST_CHARS else \
            text[:_STATUS_MOST_CHARS - 1].rstrip() + "…"
        element.update(shown, text_color=COLOURS["error_text" if error else "muted"])
        if shown != text:
            element.set_tooltip(_wrapped(text, _TOOLTIP_LINE_CHARS))
        else:
            element.remove_tooltip()
        if not self.trace.enabled:
            return
        # For the trace: where it shows and the height its lines ask for
        # (whole if the box is that tall), then the layout.
        self.window.TKroot.update_idletasks()       # not refresh(): see trace_layout
        self.trace("launcher_status", text=text, shown=shown, error=error,
                   box=_screen_box(element.Widget), asked=element.Widget.winfo_reqheight())
        self.trace_layout()

    def busy(self, busy: bool) -> None:
        for name in ("join", "host"):
            self.window[(_ROOM, name)].update(disabled=busy)

    def typed_address(self) -> str:
        """The address field, unless it only holds a discovered host (those
        are found again next time; a typed one is worth remembering)."""
        address = self.field("address")
        found = {address_text(h["address"], h["port"]) for h in self.hosts}
        return "" if address in found else address

    def trace_layout(self) -> None:
        """For the trace: where the window, its buttons and host rows are."""
        if not self.trace.enabled:
            return
        window = self.window
        # Geometry settles in Tk's idle tasks. Not window.refresh(): it would
        # also run a click waiting in the queue, inside this handler, and
        # PySimpleGUI would lose it.
        window.TKroot.update_idletasks()
        tree = window[(_ROOM, "hosts")].Widget
        rows = []
        for index, (host, room) in enumerate(self.rows):
            box = tree.bbox(str(index + 1))
            rows.append({"name": host["name"], "port": host["port"], "rooms": host["rooms"],
                         "room": room["room"] if room else None,
                         "alive": host.get("alive", True), "key": host.get("fingerprint"),
                         "box": [tree.winfo_rootx() + box[0], tree.winfo_rooty() + box[1],
                                 box[2], box[3]] if box else None})
        self.trace("window", name="launcher", xid=int(window.TKroot.wm_frame(), 16),
                   box=_screen_box(window.TKroot), rows=rows,
                   fields={name: self.field(name) for name in ("address", "room", "user")},
                   password=bool(self.password()),     # whether one is typed, never what
                   elements={name: _screen_box(window[(_ROOM, name)].Widget)
                             for name in ("join", "host", "address", "room", "user",
                                          "password", "accept_key", "theme")},
                   key_box=self.changed_key is not None, key=window[(_ROOM, "key")].get())


def _row_text(host: dict, room: dict | None) -> list[str]:
    """A launcher row: room, people, host, address, key (room None: a new
    one). The key's first groups; picking the row shows more of it."""
    where = [printable(host["name"]), address_text(host["address"], host["port"]),
             show_fingerprint(host["fingerprint"])[:9] + "…" if host.get("fingerprint")
             else "none"]
    if not host.get("alive", True):         # its record outlived it, or a firewall
        return ["(not answering)", "", *where]
    if host.get("version") != PROTOCOL_VERSION:
        return [f"(protocol {host.get('version')}; this is {PROTOCOL_VERSION})", "", *where]
    if room is None:
        more = host.get("rooms_total", 0) - len(host["rooms"])
        return [f"+ a new room ({more} more not listed)" if more > 0 else "+ a new room",
                "", *where]
    return [printable(room["room"]), str(room["members"]), *where]


# --- The chat window ---------------------------------------------------------

# =============================================================================
# 28. GUI CHAT WINDOW: a room's conversations, its members, the input line
# =============================================================================
# The window of one room (split from GUI WINDOWS when private conversations
# took it past 900 lines): the room's conversation and one per person
# talked to privately, the members list that picks between them, the line
# to type in, the banners of a dropped connection, and the close-anyway
# question. Like the launcher, it shows what the app tells it and reports
# what was clicked; it never calls the core.

class _ConversationTrace(GuiTrace):
    """The window's trace, each record naming its conversation: None for
    the room's, else the other person's ID (tests tell them apart)."""

    def __init__(self, trace: GuiTrace, conversation: str | None) -> None:
        super().__init__(trace.enabled, trace.stream)
        self.conversation = conversation

    def __call__(self, what: str, **fields: Any) -> None:
        super().__call__(what, conversation=self.conversation, **fields)


_NAMES_MOST_PX = 420               # the widest the room's name and address keep the window


class ChatWindow:
    """One room: its conversations, the members, a line to type in, and
    buttons to send a file or start a video call.

    The room's conversation and one per person talked to privately, each
    its own ChatView on its own canvas; one is shown at a time, and what
    is typed goes there. `view` is the one shown (notes and echoes of
    commands go to it), `room_view` the room's. A line for a conversation
    not shown raises its unread count, on its row in the members list and,
    all of them together, in the window's title; showing it clears it."""

    def __init__(self, look: Look, images: Images, ready: dict, trace: GuiTrace,
                 max_shown: int = GUI_MAX_SHOWN, sound: bool = False,
                 ask_above: int = GUI_ASK_ABOVE) -> None:
        import PySimpleGUI as sg
        self.look = look
        self.trace = trace
        self.me = ready["user"]
        self.room = ready["room"]
        self.seen: collections.deque[Any] = collections.deque(maxlen=1024)  # seqs shown
        self.invites: dict[str, ChatEntry] = {}     # id_key(caller) -> its ringing card
        self.help: HelpPanel | None = None          # the help panel, once asked for
        self.history_started = False
        px = look.px
        where = (f"on {printable(ready.get('host') or ready['address'])} · "
                 f"{address_text(ready['address'], ready['port'])}")
        self.protected = bool(ready.get("protected"))   # the room has a password
        if self.protected:
            where = f"protected by a password · {where}"
        title = [sg.Text(printable(self.room), font=look.font(15, "bold"), pad=0,
                         key=(_CHAT, "title")),
                 sg.Image(data=images.lock(px(18)), pad=((px(6), 0), 0), key=(_CHAT, "lock"),
                          visible=self.protected)]
        header = [
            sg.Image(data=images.icon(px(36)), pad=((0, px(10)), 0)),
            sg.Column([title,
                       [sg.Text(f"{where} · you are {printable(self.me)}", font=look.font(9),
                                text_color=COLOURS["muted"], pad=0, key=(_CHAT, "subtitle"))],
                       [sg.Text(f"Encrypted · host key {show_fingerprint(ready['fingerprint'])}"
                                if ready.get("fingerprint") else
                                "NOT ENCRYPTED: --insecure, anyone on the network can read this",
                                font=look.font(8), pad=0, key=(_CHAT, "key"),
                                text_color=COLOURS["faint"] if ready.get("fingerprint")
                                else COLOURS["error_text"])]],
                      pad=0, key=(_CHAT, "names")),
            sg.Push(),
            _button(ask_button_text(ask_above), (_CHAT, "ask"), look, primary=False,
                    pad=((0, px(8)), 0),
                    tooltip="Files larger than this wait for Accept or Decline; click to change"),
            _button(sound_button_text(sound), (_CHAT, "sound"), look, primary=False,
                    pad=((0, px(8)), 0)),
            _button(theme_button_text(), (_CHAT, "theme"), look, primary=False,
                    pad=((0, px(8)), 0)),
            _button("Leave", (_CHAT, "leave"), look, primary=False)]
        side = sg.Column([
            [sg.Text("MEMBERS", font=look.font(9, "bold"), text_color=COLOURS["muted"],
                     background_color=COLOURS["panel"], pad=(px(12), (px(10), px(4)))),
             sg.Text("", key=(_CHAT, "count"), font=look.font(9), pad=(0, (px(10), px(4))),
                     text_color=COLOURS["faint"], background_color=COLOURS["panel"])],
            [sg.Canvas(key=(_CHAT, "members"), size=(px(210), px(160)), pad=0,
                       background_color=COLOURS["panel"], expand_y=True, expand_x=True)],
            [sg.Text("", key=(_CHAT, "target"), font=look.font(9), size=(28, 3),
                     text_color=COLOURS["muted"], background_color=COLOURS["panel"],
                     pad=(px(12), (px(6), px(12))))],
        ], background_color=COLOURS["panel"], expand_y=True, pad=((px(12), 0), 0),
            key=(_CHAT, "side"))
        footer = [
            _button("Send file", (_CHAT, "file"), look, primary=False),
            _button("Video call", (_CHAT, "video"), look, primary=False),
            sg.Column([[_message_box((_CHAT, "input"), look)]], expand_x=True, pad=(px(8), 0)),
            _button("☺", (_CHAT, "emoji"), look, primary=False,
                    tooltip="Insert an emoji"),
            _button("Send", (_CHAT, "send"), look, bind_return_key=True)]
        banner = sg.Text("", key=(_CHAT, "banner"), font=look.font(10, "bold"),
                         text_color=COLOURS["error_text"], background_color=COLOURS["error"],
                         expand_x=True, visible=False, pad=(0, (px(8), 0)))
        # Over a private conversation: whose it is, and the way back to the room.
        private_bar = sg.Column([[
            sg.Text("", key=(_CHAT, "with"), font=look.font(10, "bold"),
                    text_color=COLOURS["info_text"], background_color=COLOURS["info"],
                    pad=(px(10), px(6))),
            sg.Push(background_color=COLOURS["info"]),
            _button("\u2190 Back to the room", (_CHAT, "room"), look, primary=False,
                    pad=(px(6), px(4)))]],
            key=(_CHAT, "private"), visible=False, expand_x=True, pad=(0, (px(8), 0)),
            background_color=COLOURS["info"])
        layout = [
            header,
            [banner],
            [private_bar],
            [sg.Column([[sg.Canvas(key=(_CHAT, "view"), size=(px(420), px(260)), pad=0,
                                   background_color=COLOURS["chat"], expand_x=True,
                                   expand_y=True)]], expand_x=True, expand_y=True,
                       pad=(0, (px(10), px(8))), key=(_CHAT, "middle")),
             side],
            footer,
            [sg.Text("Enter sends · Shift+Enter starts a new line · Ctrl+F searches · help "
                     "shows what you can do · /send PATH sends a file", font=look.font(8),
                     text_color=COLOURS["faint"], pad=0, key=(_CHAT, "hint"))],
        ]
        self.window = sg.Window(self._title(0), layout, finalize=True,
                                enable_close_attempted_event=True, resizable=True,
                                icon=images.icon(64), font=look.font(10))
        _polish_buttons(self.window, look)
        _close_button_posts(self.window)
        # PySimpleGUI lets the last element of a row decide how the row fills;
        # the members' column (tall only) would stop the conversation from
        # growing sideways. The row fills both ways; the members keep their width.
        side = self.window[(_CHAT, "side")].Widget
        side.master.pack_configure(expand=True, fill="both")
        side.pack_configure(expand=False, fill="y")
        # Tk shrinks what was packed last first: the footer and its hint are
        # packed (at the bottom) before the conversation, so a small window
        # squeezes the conversation, never the message box or Send.
        middle = side.master
        hint = self.window[(_CHAT, "hint")].Widget.master
        footer_row = self.window[(_CHAT, "send")].Widget.master
        hint.pack_configure(side="bottom", before=middle)
        footer_row.pack_configure(side="bottom", before=middle)
        # Sideways the same way: the header's buttons (from the right) before
        # the room's name and address, the members before the conversation,
        # so a narrow window cuts those, never Leave or the members. And the
        # window is never narrower than what the header's buttons and the
        # members ask for (a review found Leave off screen at the minimum).
        names = self.window[(_CHAT, "names")].Widget
        for name in ("leave", "theme", "sound", "ask"):
            self.window[(_CHAT, name)].Widget.pack_configure(side="right", before=names)
        side.pack_configure(side="right", before=self.window[(_CHAT, "middle")].Widget)
        # And down the members' column: the list shrinks before the line
        # under it that says who you write to.
        self.window[(_CHAT, "target")].Widget.master.pack_configure(
            side="bottom", before=self.window[(_CHAT, "members")].Widget.master)
        _fit_on_screen(self.window, (max(px(620), self._least_width()), px(420)),
                       (px(900), px(700)))
        if trace.enabled:                   # tests follow resizes through the trace
            self.window.TKroot.bind("<Configure>", self._on_resize, add="+")
        self._resize_job: str | None = None
        self.pending: dict[str, ChatEntry] = {}     # our lines the host hasn't echoed
        post = self.window.write_event_value
        view = self.window[(_CHAT, "view")].Widget
        self._bar = self._add_scrollbar(view)
        self._images, self._post, self._max_shown = images, post, max_shown
        self.view = ChatView(view, look, images, post, _ConversationTrace(trace, None),
                             max_shown)
        self.room_view = self.view
        # id_key(user) (None: the room) -> its conversation, the other's ID,
        # the lines not read yet; and which conversation each of our own
        # unconfirmed lines and ringing cards is drawn in.
        self.views: dict[str | None, ChatView] = {None: self.view}
        self.names: dict[str | None, str | None] = {None: None}
        self.unread: dict[str | None, int] = {}
        self.shown: str | None = None
        self._pending_views: dict[str, ChatView] = {}
        self._invite_views: dict[str, ChatView] = {}
        self.emoji = EmojiPicker(self.window[(_CHAT, "emoji")].Widget,
                                 self.window[(_CHAT, "input")].Widget, look, trace)
        self.box = MessageBox(self.window[(_CHAT, "input")], lambda: self.view.widget,
                              post, trace)
        self.search = SearchBar(footer_row, look, self.view, self.box.widget, trace)
        self.window.TKroot.bind("<Control-f>", lambda _e: self.search.open())
        accept_file_drops(self.window.TKroot, post, trace)
        self.members = MemberList(self.window[(_CHAT, "members")].Widget, look, images,
                                  self.me, post)
        self.members.set(ready["members"])
        self.pick(None)
        self.count()
        self.trace_layout()

    def _least_width(self) -> int:
        """The narrowest the window may be: each row at the width it asks
        for, except the room's name and address, which count for at most
        _NAMES_MOST_PX (a long host name must not make the window wide; Tk
        cuts them first, see __init__)."""
        root = self.window.TKroot
        root.update_idletasks()
        names = self.window[(_CHAT, "names")].Widget
        spare = max(0, names.winfo_reqwidth() - self.look.px(_NAMES_MOST_PX))
        rows = [row for row in root.winfo_children() if row.winfo_manager() == "pack"]
        asked = max(row.winfo_reqwidth() for row in rows)
        least = max(row.winfo_reqwidth() - (spare if row is names.master else 0)
                    for row in rows)
        return root.winfo_reqwidth() - asked + least    # the window's own margins kept

    def _on_resize(self, event: Any) -> None:
        """Trace the layout again once a resize rests (trace mode only)."""
        if event.widget is not self.window.TKroot:
            return
        if self._resize_job is not None:
            self.window.TKroot.after_cancel(self._resize_job)
        self._resize_job = self.window.TKroot.after(_RELAYOUT_DELAY_MS, self._traced_resize)

    def _traced_resize(self) -> None:
        self._resize_job = None
        self.trace_layout()

    def _add_scrollbar(self, canvas: Any) -> Any:
        """A slim scrollbar beside the conversation (PySimpleGUI's Canvas has
        none): a thumb in a trough, no arrows."""
        from tkinter import ttk
        style = ttk.Style(canvas)
        trough: Any = {"sticky": "ns", "children": [("Vertical.Scrollbar.thumb",
                                                     {"expand": "1", "sticky": "nswe"})]}
        style.layout("Chat.Vertical.TScrollbar", [("Vertical.Scrollbar.trough", trough)])
        self._style_scrollbar(style)
        bar = ttk.Scrollbar(canvas.master, orient="vertical", command=canvas.yview,
                            style="Chat.Vertical.TScrollbar")
        canvas.configure(yscrollcommand=bar.set)
        bar.pack(side="right", fill="y", before=canvas)
        return bar

    def _style_scrollbar(self, style: Any) -> None:
        style.configure("Chat.Vertical.TScrollbar", troughcolor=COLOURS["chat"],
                        background=COLOURS["line"], bordercolor=COLOURS["chat"],
                        lightcolor=COLOURS["line"], darkcolor=COLOURS["line"],
                        troughrelief="flat", relief="flat", borderwidth=0,
                        width=self.look.px(8))
        style.map("Chat.Vertical.TScrollbar", background=[("active", COLOURS["faint"])])

    # --- conversations ---

    def _title(self, unread: int) -> str:
        return (f"({unread}) " if unread else "") + f"{printable(self.room)} · chatroom"

    @property
    def talking_to(self) -> str | None:
        """The person whose conversation is shown (None: the room's)."""
        return self.names[self.shown]

    def conversation(self, user: str | None) -> ChatView:
        """The conversation with `user` (None: the room's), made if new."""
        key = None if user is None else id_key(user)
        view = self.views.get(key)
        if view is None:
            import tkinter
            first = self.room_view.widget
            canvas = tkinter.Canvas(first.master, width=first.cget("width"),
                                    height=first.cget("height"), highlightthickness=0,
                                    borderwidth=0, background=COLOURS["chat"])
            view = ChatView(canvas, self.look, self._images, self._post,
                            _ConversationTrace(self.trace, user), self._max_shown)
            self.views[key], self.names[key] = view, user
            view.add("notice", style="info", text=f"Private conversation with "
                     f"{printable(user or '')}: only the two of you see what is written "
                     "here, and nobody who joins later.")
        return view

    def member_named(self, user: str) -> str:
        """`user` as the members list spells it (IDs ignore case), or as given."""
        return next((m for m in self.members.members if id_key(m) == id_key(user)), user)

    def _arrived(self, view: ChatView) -> None:
        """A line for `view`: one more unread unless it is shown."""
        key = next(k for k, v in self.views.items() if v is view)
        if key != self.shown:
            self.unread[key] = self.unread.get(key, 0) + 1
            self._show_unread()

    def _show_unread(self) -> None:
        total = sum(self.unread.values())
        self.members.set_unread(self.unread)
        self.window.set_title(self._title(total))
        self.trace("unread", counts={self.names[k] or "": n for k, n in self.unread.items()
                                     if n}, total=total, title=self._title(total))

    def _switch(self, user: str | None) -> None:
        """Show the conversation with `user` (None: the room's)."""
        view = self.conversation(user)
        key = None if user is None else id_key(user)
        if view is not self.view:
            old = self.view.widget
            packing = {k: v for k, v in old.pack_info().items() if k != "in"}
            old.pack_forget()
            view.widget.pack(**packing)
            view.widget.configure(yscrollcommand=self._bar.set)
            self._bar.configure(command=view.widget.yview)
            self.view = view
            self.search.follow(view)
        self.shown = key
        if self.unread.pop(key, 0):
            self._show_unread()
        private = self.window[(_CHAT, "private")]
        if user is not None:
            self.window[(_CHAT, "with")].update(
                f"Private conversation with {printable(user)}")
        private.update(visible=user is not None)
        if user is None:                    # Tk keeps an emptied frame's size: let it go
            private.ParentRowFrame.configure(height=1)
        self.trace("conversation", user=user)

    def recolour(self) -> None:
        """After a theme switch (recolour_widgets did the plain widgets):
        the scrollbar's style, the toggle's label, and the canvases (every
        conversation, and the members) drawn again in the new colours."""
        from tkinter import ttk
        self._style_scrollbar(ttk.Style(self.view.widget))
        self.window[(_CHAT, "theme")].update(theme_button_text())
        drawings = [(view, COLOURS["chat"]) for view in self.views.values()]
        for drawing, colour in drawings + [(self.members, COLOURS["panel"])]:
            drawing.background = colour
            drawing.widget.configure(background=colour)
        for view in self.views.values():    # every conversation, shown or not
            view.redraw()
        self.members.set(self.members.members)
        if self.help is not None and self.help.open:    # its tags hold the old colours
            self.on_help({"text": self.help.source})
        self.trace_layout()

    # --- events from the room ---

    def sending(self, text: str, msg_id: str, to: str | None = None) -> None:
        """Our line is on its way: shown at once in its conversation (the
        room's, or the one with `to`), marked until the host's echo
        confirms it (so a line typed into a frozen host never vanishes)."""
        view = self.conversation(to)
        self._pending_views[msg_id] = view
        self.pending[msg_id] = view.add("message", **{
            "from": self.me, "text": text, "ts": unix_now(), "mine": True, "seq": 0,
            "history": False, "id": msg_id, "state": "sending"})

    def _mark(self, msg_id: str, entry: ChatEntry, **changes: Any) -> None:
        """Redraw our line `msg_id` in its conversation with `changes`."""
        self._pending_views.get(msg_id, self.view).update(entry, "message_state", **changes)

    def unconfirmed(self, older_than_s: float) -> None:
        """Lines the host hasn't confirmed for a while: say so on them."""
        now = unix_now()
        for msg_id, entry in self.pending.items():
            if entry.data["state"] == "sending" and now - entry.data["ts"] > older_than_s:
                self._mark(msg_id, entry, state="late")

    def on_message(self, event: dict) -> None:
        if event.get("seq") in self.seen:
            return                          # shown already (a resent confirmation)
        self.seen.append(event.get("seq"))
        mine = id_key(event["from"]) == id_key(self.me)
        to = event.get("to")                # a private line: the other one's conversation
        view = self.conversation((to if mine else event["from"]) if to else None)
        if event.get("history") and not self.history_started:
            self.history_started = True
            view.add("divider", text="Earlier messages")
        msg_id = event.get("id", "")
        sent = self.pending.pop(msg_id, None)
        if sent is not None and mine:
            self._mark(msg_id, sent, state="sent", ts=event.get("ts"), seq=event.get("seq", 0))
            self._pending_views.pop(msg_id, None)
            return
        view.add("message", **{"from": event["from"], "text": event["text"],
                               "ts": event.get("ts"), "seq": event.get("seq", 0),
                               "history": bool(event.get("history")), "mine": mine})
        if not mine and not event.get("history"):
            self._arrived(view)

    def on_system(self, event: dict) -> None:
        self.room_view.add("notice", style="system", text=event["text"], ts=event.get("ts"))
        if event.get("event") == "enter":
            self.members.add(event["user"])
        elif event.get("event") == "leave":
            self.members.remove(event["user"])
            private = self.views.get(id_key(event["user"]))
            if private is not None:         # said where we talked with them, too
                private.add("notice", style="system", text=event["text"],
                            ts=event.get("ts"))
            if self.unread.pop(id_key(event["user"]), 0):
                self._show_unread()         # their row is gone: no count to clear there
        self.count()

    def on_members(self, event: dict) -> None:
        self.members.set(event["members"])
        self.count()
        self.note(f"In the room ({len(event['members'])}): "
                  + ", ".join(printable(m) for m in event["members"]))

    def on_help(self, event: dict) -> None:
        """The host's help, as a table in its own panel (a new answer
        replaces the one showing)."""
        if self.help is not None:
            self.help.close()
        self.help = HelpPanel(self.window.TKroot, self.look, event["text"], self.trace)

    def on_error(self, event: dict) -> None:
        msg_id = event.get("id") or ""
        mine = self.pending.pop(msg_id, None)
        if mine is not None:                # our line was refused (rate_limited, too long)
            self._mark(msg_id, mine, state="refused")
            self._pending_views.pop(msg_id, None)
        self.note(_sentence(event["message"]), "error")

    def on_call_invite(self, event: dict) -> None:
        """[SYSTEM] <alice> CALL YOU, and a card to call back or decline,
        counting down; it stays, saying what became of the call."""
        self.on_call_event(event)
        user = event["from"]
        # A host says how long an invitation lasts; one that doesn't (no
        # `expires`) keeps the protocol's default, so that is what is shown.
        expires = time.monotonic() + (event.get("expires") or CALL_TIMEOUT_S)
        old = self.invites.pop(id_key(user), None)
        if old is not None:                 # a renewed invitation: one card is enough
            old.data["title"] = f"{printable(user)} called you"
            self._invite_views.pop(id_key(user), self.view).update(
                old, "call_card", state="renewed", status="Called again below")
        self._invite_views[id_key(user)] = self.view    # where we look now
        self.invites[id_key(user)] = self.view.add(
            "call", user=user, ts=unix_now(), state="ringing", expires=expires,
            title=f"{printable(user)} is calling you", status=_time_left(expires))

    def tick_invites(self) -> bool:
        """Count the ringing cards down; True while any rings."""
        for key, entry in self.invites.items():
            status = _time_left(entry.data["expires"])
            if status != entry.data["status"]:
                self._invite_views.get(key, self.view).update(entry, "call_card",
                                                              status=status)
        return bool(self.invites)

    def invite_over(self, user: str, state: str, status: str) -> None:
        """The call from `user` was answered, declined or missed: its card
        no longer rings, so it says "called you"."""
        entry = self.invites.pop(id_key(user), None)
        if entry is not None:
            entry.data["title"] = f"{printable(user)} called you"
            self._invite_views.pop(id_key(user), self.view).update(
                entry, "call_card", state=state, status=status)

    def on_call_missed(self, event: dict) -> None:
        self.on_call_event(event)
        self.invite_over(event["from"], "missed", f"Missed call · {_clock(unix_now())}")

    def on_call_event(self, event: dict) -> None:
        """A call event, as a notice: the host's own ([SYSTEM]) or ours."""
        text = CALL_LINES[event["type"]](event)
        if event["type"] in ("call_invite", "call_missed"):     # from the host alone
            self.view.add("notice", style="system", text=text, ts=unix_now())
        else:
            self.note(text)

    def note(self, text: str, style: str = "info") -> None:
        """A line from this program (not the host): centred, in its colours."""
        self.view.add("notice", style=style, text=text)

    def count(self) -> None:
        self.window[(_CHAT, "count")].update(f"{len(self.members.members)}")
        if self.trace.enabled:
            self.trace("members", members=self.members.members,
                       rows=self.members.screen_rows())

    def pick(self, user: str | None) -> None:
        """Show the conversation with `user`, or the room's (None): what is
        typed and the files sent now go to `user` alone, or to the room."""
        if user is not None:
            user = self.member_named(user)
        self.members.pick(user)
        self._switch(user)
        self.trace("picked", user=user)
        self.window[(_CHAT, "target")].update(
            "What you write and send goes to everyone in the room. Click a member "
            "to talk to them alone." if user is None
            else f"What you write and send goes to {printable(user)} only.")
        self.trace_layout()
        self.count()                        # (the bar moved the members' rows: trace them)

    def reconnecting(self, event: dict) -> None:
        """The connection dropped and the core is getting back: a banner
        says so and when it tries next. The input stays: what you type now
        shows as sending, and goes once back."""
        text = reconnecting_line(event)
        if event.get("attempt") == 1:
            self.note(text.split(";")[0] + ".", "error")
        self.window[(_CHAT, "banner")].update(f"  {text}", visible=True)
        self.trace("reconnecting", attempt=event.get("attempt"), text=text)
        self.trace_layout()

    def back(self, event: dict) -> None:
        """In the room again: `resumed` (the same seat: what was missed
        follows) or a fresh `ready` (the host had forgotten us: it restarted,
        or we were away past its grace period)."""
        self.window[(_CHAT, "banner")].update("", visible=False)
        if event["type"] == "ready":
            self.seen.clear()               # a new room at the host: seqs start again
            self.note(f"Back in {printable(event['room'])}, as a newcomer: the host had "
                      "forgotten this session (it restarted, or you were away too long).")
        else:
            self.note(resumed_line(event))
        self.members.set(event["members"])
        self.count()
        self.trace("back", fresh=event["type"] == "ready")
        self.trace_layout()

    def ended(self, reason: str) -> None:
        """The connection is gone: a banner says why, the input greys out,
        each line the host never confirmed is marked not sent, and Leave
        goes back to the hosts."""
        why = CLOSED_REASONS.get(reason, f"Disconnected ({reason}).")
        self.note(why, "error")
        self.window[(_CHAT, "banner")].update(f"  {why} Nothing you type now is sent.",
                                               visible=True)
        for name in ("input", "send", "file", "video", "emoji"):
            self.window[(_CHAT, name)].update(disabled=True)
        self.window[(_CHAT, "input")].Widget.configure(background=COLOURS["track"])
        self.window[(_CHAT, "leave")].update("Back to hosts")
        for msg_id, entry in self.pending.items():
            self._mark(msg_id, entry, state="unsent")
        self.pending.clear()
        self._pending_views.clear()
        self.trace("ended", reason=reason)
        self.trace_layout()

    def take_input(self) -> str:
        return self.box.take()

    def restore_input(self, text: str) -> None:
        """A refused line comes back to the field, unless you typed on."""
        self.box.restore(text)

    # --- files: one card per transfer ---

    # A file for one person is in the conversation with them, a file for
    # everyone in the room's.

    def _files(self, key: tuple[str, int]) -> ChatView:
        """The conversation that shows the card of transfer `key`."""
        return next((v for v in self.views.values() if key in v.files), self.room_view)

    def on_file_offer(self, event: dict) -> None:
        size = human_size(event["size"])
        self._card("receive", event["transfer"], event["name"], event["from"],
                   f"{size} · {'for you only' if event.get('to') else 'for everyone'}",
                   event["from"] if event.get("to") else None)
        if event.get("ask"):
            key = ("receive", event["transfer"])
            self._files(key).update_file(key, state="asking", status="Take this file?")

    def file_answered(self, transfer: int, accept: bool) -> None:
        """Accept or Decline was clicked: the card stops asking at once."""
        if accept:
            key = ("receive", transfer)
            self._files(key).update_file(key, state="moving", status="Starting...")

    def on_file_progress(self, event: dict) -> None:
        key = (event["direction"], event["transfer"])
        view = self._files(key)
        if key not in view.files and event["direction"] == "send":
            to = event.get("to")
            self._card("send", event["transfer"], event["name"], self.me,
                       f"{human_size(event['size'])} · to "
                       f"{printable(to) if to else 'everyone'}", to or None,
                       1 if to else len(self.members.members) - 1)
            view = self._files(key)
        if view.files.get(key) is None or view.files[key].data["state"] != "moving":
            return
        eta = event.get("eta")
        moving = eta is not None and event["bytes"] < event["size"]
        left = f" · {eta:.0f} s left" if moving else ""
        view.update_file(key, percent=event["percent"], status=(
            f"{event['percent']:.0f}% · {human_size(event['rate'])}/s{left}"
            if event["bytes"] else "Starting..."))

    def on_file_received(self, event: dict) -> None:
        key = ("receive", event["transfer"])
        self._files(key).update_file(key, state="done", percent=100.0, path=event["path"],
                                     name=event["name"],
                                     status=f"Saved · {human_size(event['size'])}")

    def on_file_sent(self, event: dict) -> None:
        key = ("send", event["transfer"])
        self._files(key).update_file(key, state="done", percent=100.0,
                                     status="Sent · the host has it all")

    def on_file_delivered(self, event: dict) -> None:
        key = ("send", event["transfer"])
        view = self._files(key)
        entry = view.files.get(key)
        if entry is not None:
            saved = entry.data.get("saved_by", []) + [printable(event["user"])]
            view.update_file(key, saved_by=saved, settled=self._answered(entry, event["user"]),
                             status="Saved by " + ", ".join(saved))

    def on_file_failed(self, event: dict) -> None:
        if event.get("transfer") is None:
            return                          # refused at once: its `error` said why
        key = (event["direction"], event["transfer"])
        view = self._files(key)
        entry = view.files.get(key)
        if entry is None:
            return
        by = event.get("by")
        stopped = {"declined": "Declined", "cancelled": "Cancelled"}.get(event["code"])
        if event.get("user"):               # one recipient failed; the others go on
            if stopped and by:
                self.note(f"{printable(event['name'])}: {printable(event['user'])} "
                          f"{stopped.lower()} it", "info")
            else:
                self.note(f"{printable(event['name'])}: {printable(event['user'])} didn't "
                          f"get it: {printable(event['reason'])}", "error")
            view.update_file(key, settled=self._answered(entry, event["user"]))
            return
        if stopped and by:
            whom = "you" if by == self.me else printable(by)
            view.update_file(key, state="failed", status=f"{stopped} by {whom}")
            return
        view.update_file(key, state="failed", status="Failed: " + printable(event["reason"]))

    @staticmethod
    def _answered(entry: ChatEntry, user: str) -> bool:
        """`user` has (or won't have) the file we send: was that the last
        of the members it went to? Then Cancel has nothing left to stop."""
        entry.data["answered"] = entry.data.get("answered", 0) + 1
        return entry.data["answered"] >= entry.data["recipients"]

    def _card(self, direction: str, transfer: int, name: str, user: str, detail: str,
              conversation: str | None = None, recipients: int = 1) -> None:
        view = self.conversation(conversation)
        entry = view.add("file", direction=direction, transfer=transfer, name=name,
                         user=user, ts=unix_now(), detail=detail, percent=0.0,
                         status="Waiting...", state="moving", path="",
                         recipients=recipients)
        view.files[(direction, transfer)] = entry
        if direction == "receive":
            self._arrived(view)

    def trace_layout(self) -> None:
        if not self.trace.enabled:
            return
        self.window.TKroot.update_idletasks()       # not refresh(): see Launcher
        banner = self.window[(_CHAT, "banner")]
        self.trace("window", name="chat", xid=int(self.window.TKroot.wm_frame(), 16),
                   box=_screen_box(self.window.TKroot),
                   elements={**{name: _screen_box(self.window[(_CHAT, name)].Widget)
                                for name in ("input", "send", "file", "video", "leave",
                                             "members", "emoji", "theme", "sound",
                                             "ask", "target")},
                             "view": _screen_box(self.view.widget),
                             **({"room": _screen_box(self.window[(_CHAT, "room")].Widget)}
                                if self.shown is not None else {})},
                   conversation=self.talking_to,
                   disabled={name: str(self.window[(_CHAT, name)].Widget.cget("state"))
                             in ("disabled", "readonly") for name in ("input", "send")},
                   banner=banner.get() if banner.visible else "", protected=self.protected,
                   lock=_screen_box(self.window[(_CHAT, "lock")].Widget)
                   if self.protected else None,
                   key=self.window[(_CHAT, "key")].get(),
                   # For Tk's `send` from a test: this interpreter, this toplevel.
                   interp=str(self.window.TKroot.tk.call("tk", "appname")),
                   toplevel=str(self.window.TKroot))

    def close(self) -> None:
        if self._resize_job is not None:
            self.window.TKroot.after_cancel(self._resize_job)
        for view in self.views.values():
            view.close()
        self.window.close()


_CONFIRM = "-CONFIRM-"              # the close-anyway question's keys


class ConfirmWindow:
    """"Close anyway?": asked when closing would stop a file or end a room
    others are in. Not modal: the loop reads it like any window."""

    def __init__(self, look: Look, images: Images, trace: GuiTrace, worry: str) -> None:
        import PySimpleGUI as sg
        self.trace = trace
        px = look.px
        layout = [[sg.Text(worry, font=look.font(10), size=(44, 3), pad=(0, (0, px(10))))],
                  [sg.Push(), _button("Keep it open", (_CONFIRM, "no"), look, primary=False),
                   _button("Close anyway", (_CONFIRM, "yes"), look)]]
        self.window = sg.Window("Close chatroom?", layout, finalize=True, modal=False,
                                keep_on_top=True, enable_close_attempted_event=True,
                                icon=images.icon(64), font=look.font(10))
        _polish_buttons(self.window, look)
        _close_button_posts(self.window)
        if trace.enabled:
            self.window.TKroot.update_idletasks()
            trace("window", name="confirm", xid=int(self.window.TKroot.wm_frame(), 16),
                  text=worry, box=_screen_box(self.window.TKroot),
                  elements={name: _screen_box(self.window[(_CONFIRM, name)].Widget)
                            for name in ("yes", "no")})

    def close(self) -> None:
        self.window.close()


def _time_left(expires: float) -> str:
    """"Call back within 42 s" for a deadline on the monotonic clock."""
    return f"Call back within {max(0, math.ceil(expires - time.monotonic()))} s"


def _sentence(text: str) -> str:
    """"message is too long" -> "Message is too long." (errors read as sentences)."""
    text = printable(text.strip())
    if not text:
        return text
    return text[0].upper() + text[1:] + ("" if text[-1] in ".!?" else ".")


# =============================================================================
# 29. GUI CALLS: the call window, a tile per person, ESC and Backspace
# =============================================================================
# One window holds every call in progress: your own camera first, then a
# tile per peer, in a grid that reflows as people join and leave, each
# named. Frames never ride the event queue: the app's loop asks for the
# newest frame of each tile about 30 times a second (`refresh`), skips the
# ones it has shown, and hands each to Tk as PPM into a persistent image (a
# slow window shows fewer frames; it never falls behind). Clicking a tile
# selects it: ESC on a peer's tile hangs up on that peer, Backspace on your
# own hangs up every call (the seed's keys); the buttons do the same, plus
# mute and camera. Closing the window hangs up everything. On the same
# clock a tile lights up (a green ring, a dot by the name) while its person
# speaks, from the media engine's levels(); and while no echo canceller
# runs on a real microphone (no livekit, or --no-echo-cancel) a line under
# the tiles suggests headphones. The window decides nothing: it reports
# what was pressed, and the app calls the core.

_CALL = "-CALL-"                    # the call window's element keys: (_CALL, name)
CALL_REFRESH_S = 1 / 30             # the loop looks for new frames this often
CALL_BACKGROUND = "#14171C"
CALL_LABEL = "#0B0D10"              # behind a tile's name (Tk has no transparency)
DEVICE_ERRORS = frozenset({"no_camera", "no_audio_device", "missing_package"})  # said there too
SPEAKING_COLOUR = "#3DDC84"         # the ring and dot of a tile whose person speaks
SPEAKING_HOLD_S = 0.4               # lit this long after the voice dips (between words)
HEADPHONES_HINT = ("No echo cancelling here: with speakers, the others hear themselves. "
                   "Headphones help.")


def tile_grid(count: int, width: int, height: int, gap: int
              ) -> list[tuple[int, int, int, int]]:
    """Boxes (x, y, width, height) for `count` 4:3 tiles in a width x height
    area: the number of columns that makes them largest, rows filled left to
    right, the whole block centred and a short last row centred under it."""
    if count <= 0:
        return []
    best = (0, 1)
    for columns in range(1, count + 1):
        rows = math.ceil(count / columns)
        tile_w = min((width - gap * (columns + 1)) // columns,
                     (height - gap * (rows + 1)) // rows * 4 // 3)
        if tile_w > best[0]:
            best = (tile_w, columns)
    tile_w, columns = max(best[0], 8), best[1]
    tile_h = max(6, tile_w * 3 // 4)
    rows = math.ceil(count / columns)
    top = (height - rows * tile_h - (rows - 1) * gap) // 2
    boxes = []
    for index in range(count):
        row, column = divmod(index, columns)
        in_row = min(columns, count - row * columns)
        left = (width - in_row * tile_w - (in_row - 1) * gap) // 2
        boxes.append((left + column * (tile_w + gap), top + row * (tile_h + gap),
                      tile_w, tile_h))
    return boxes


@dataclasses.dataclass(eq=False)
class Tile:
    """One person's place in the call window."""
    name: str                       # a peer's ID, or ours
    mine: bool
    photo: Any                      # a persistent tkinter.PhotoImage
    detail: str = ""                # a direct call's safety code
    serial: int = -1                # the frame shown (see MediaEngine.latest_frame)
    box: tuple[int, int, int, int] = (0, 0, 1, 1)   # x, y, width, height on the canvas
    showing: bool = False           # a frame is up (else the placeholder)
    label: tuple[int, int, int, int] = (0, 0, 0, 0)  # the name's bbox on the canvas
    speaking: bool = False          # lit: their voice is over SPEAKING_DBFS
    loud_at: float = -math.inf      # monotonic time their voice was last over it


class CallWindow:
    """The call window: tiles, a status line, buttons. `frames(name)` gives
    (serial, newest frame) for a tile, `mine` for ours (a BGR array or None);
    `levels()` how loud each voice is (MediaEngine.levels: dBFS by name,
    ours under our name); `headphones()` whether to suggest headphones
    (MediaEngine.needs_headphones). All three are asked on every refresh.
    """

    def __init__(self, look: Look, images: Images, me: str, trace: GuiTrace,
                 frames: Callable[[str, bool], tuple[int, Any]],
                 levels: Callable[[], dict[str, float]] = dict,
                 headphones: Callable[[], bool] = lambda: False) -> None:
        import tkinter

        import PySimpleGUI as sg
        self.look = look
        self.trace = trace
        self.me = me
        self.frames = frames
        self.levels = levels
        self.headphones = headphones
        self.hint_shown = False             # the headphones line is up
        self._tk_photo = tkinter.PhotoImage
        px = look.px
        ringing = sg.Column([[
            sg.Text("", key=(_CALL, "ringing_text"), font=look.font(10, "bold"),
                    text_color=COLOURS["info_text"], background_color=COLOURS["info"],
                    pad=((px(10), px(8)), px(6))),
            sg.Push(background_color=COLOURS["info"]),
            _button("Call back", (_CALL, "answer"), look),
            _button("Decline", (_CALL, "decline"), look, primary=False)]],
            key=(_CALL, "ringing"), background_color=COLOURS["info"], expand_x=True,
            visible=False, pad=(0, (0, px(6))))
        layout = [
            [sg.pin(ringing, expand_x=True, shrink=True)],   # hidden: takes no room
            [sg.Canvas(key=(_CALL, "tiles"), size=(px(560), px(340)), pad=0,
                       background_color=CALL_BACKGROUND, expand_x=True, expand_y=True)],
            [sg.Text("", key=(_CALL, "status"), font=look.font(9), text_color=COLOURS["muted"],
                     pad=(0, (px(8), px(2))), expand_x=True)],
            [sg.pin(sg.Text(HEADPHONES_HINT, key=(_CALL, "hint"), font=look.font(9),
                            text_color=COLOURS["info_text"], pad=(0, (0, px(2))),
                            visible=False), shrink=True)],
            [sg.Push(),
             _button("Mute", (_CALL, "mute"), look, primary=False),
             _button("Camera off", (_CALL, "camera"), look, primary=False),
             _button("Hang up", (_CALL, "hangup"), look, primary=False),
             _button("End all calls", (_CALL, "end"), look)],
            [sg.Text("Click a tile to pick it: Esc hangs up on that person, Backspace on "
                     "your own tile ends every call.", font=look.font(8),
                     text_color=COLOURS["faint"], pad=0, key=(_CALL, "keys"))],
        ]
        self.window = sg.Window(f"Call · {printable(me)} · chatroom", layout, finalize=True,
                                enable_close_attempted_event=True, resizable=True,
                                icon=images.icon(64), font=look.font(10), alpha_channel=0)
        _polish_buttons(self.window, look)
        _close_button_posts(self.window)
        # Long lines wrap (at the canvas's width: _on_resize), so the window
        # never grows off screen.
        for name in ("status", "hint"):
            self.window[(_CALL, name)].Widget.configure(wraplength=px(560), justify="left",
                                                        anchor="w")
        # Top right of the screen, all of it on screen: beside the chat,
        # whose newest lines and members list stay in view (a window
        # manager may still move it). Shown once it is in place.
        root = self.window.TKroot
        root.update_idletasks()
        screen_w, _screen_h = sg.Window.get_screen_size()
        self.window.move(max(0, screen_w - root.winfo_reqwidth()), 0)
        self.window.set_alpha(1)
        # Tk shrinks what was packed last first: the rows under the tiles go
        # at the bottom, packed before the canvas, so a small window squeezes
        # the tiles, never the status line or the buttons (as the chat's
        # footer). The window is never narrower than the buttons' row.
        tiles_row = self.window[(_CALL, "tiles")].Widget.master
        for key in ("keys", "end", "hint", "status"):      # bottom up
            row = self.window[(_CALL, key)].Widget
            while row.master is not tiles_row.master:       # the hint sits in a pin
                row = row.master
            row.pack_configure(side="bottom", before=tiles_row)
        root.update_idletasks()
        buttons_w = self.window[(_CALL, "end")].Widget.master.winfo_reqwidth()
        self.window.set_min_size((max(px(520), buttons_w), px(360)))
        self.window.bind("<Escape>", (_CALL, "escape"))
        self.window.bind("<BackSpace>", (_CALL, "backspace"))
        self.canvas = self.window[(_CALL, "tiles")].Widget
        self.canvas.bind("<Button-1>", self._on_click)
        self.canvas.bind("<Configure>", self._on_resize)
        self.fonts = {"name": (look.family, max(8, round(10 * look.unit / 1.33)), "bold"),
                      "small": (look.family, max(7, round(9 * look.unit / 1.33)))}
        self.tiles: list[Tile] = [self._tile(me, True)]
        self.selected: str | None = None
        self.caller: str | None = None      # ringing while we are in a call
        self._layout()

    # --- who is in it ---

    def _tile(self, name: str, mine: bool, detail: str = "") -> Tile:
        return Tile(name, mine, self._tk_photo(width=1, height=1), detail)

    def add(self, peer: str, detail: str = "") -> None:
        """A peer joined (a link is up): give it a tile, or update its detail."""
        for tile in self.tiles:
            if not tile.mine and tile.name == peer:
                tile.detail = detail or tile.detail
                self._layout()
                return
        self.tiles.append(self._tile(peer, False, detail))
        self._layout()

    def remove(self, peer: str) -> None:
        self.tiles = [t for t in self.tiles if t.mine or t.name != peer]
        if self.selected == peer:
            self.selected = None
        self._layout()

    @property
    def peers(self) -> list[str]:
        return [tile.name for tile in self.tiles if not tile.mine]

    def status(self, text: str) -> None:
        self.window[(_CALL, "status")].update(text)
        self.trace("call_status", text=text)

    def ringing(self, user: str | None) -> None:
        """Someone calls while we are in a call: a bar with Call back and
        Decline (None: nobody; the bar goes)."""
        self.caller = user
        if user is not None:
            self.window[(_CALL, "ringing_text")].update(f"{printable(user)} is calling you")
        self.window[(_CALL, "ringing")].update(visible=user is not None)
        if self.trace.enabled and user is not None:
            self.window.TKroot.update_idletasks()
        self.trace("call_ringing", user=user, elements={
            name: _screen_box(self.window[(_CALL, name)].Widget) for name in ("answer", "decline")}
            if user is not None else {})

    def media_state(self, muted: bool, video: bool) -> None:
        self.window[(_CALL, "mute")].update("Unmute" if muted else "Mute")
        self.window[(_CALL, "camera")].update("Camera on" if not video else "Camera off")

    # --- drawing ---

    def _on_resize(self, event: Any) -> None:
        """The canvas has a new size (so has the window): the lines under it
        wrap at its width, and the tiles are placed again."""
        for name in ("status", "hint"):
            self.window[(_CALL, name)].Widget.configure(
                wraplength=max(self.look.px(200), event.width - self.look.px(8)))
        self._layout()

    def _layout(self) -> None:
        """Place the tiles in the canvas: 4:3 each, as large as the canvas
        allows, the grid centred and a short last row too."""
        canvas = self.canvas
        width = max(canvas.winfo_width(), 2)
        height = max(canvas.winfo_height(), 2)
        boxes = tile_grid(len(self.tiles), width, height, self.look.px(6))
        canvas.delete("all")
        for tile, box in zip(self.tiles, boxes):
            tile.box = box
            tile.serial = -1                # draw the next frame at the new size
            tile.showing = False
            self._draw_tile(tile)
        self._trace_tiles()

    def _draw_tile(self, tile: Tile) -> None:
        canvas, px = self.canvas, self.look.px
        x, y, w, h = tile.box
        tag = f"tile:{id(tile)}"
        canvas.delete(tag)
        canvas.create_rectangle(x, y, x + w, y + h, fill="#1F242C", outline="", tags=tag)
        if tile.showing:
            canvas.create_image(x, y, anchor="nw", image=tile.photo, tags=tag)
        else:
            text = ("Camera off" if tile.mine else "Waiting for video...")
            canvas.create_text(x + w / 2, y + h / 2, text=text, fill=COLOURS["faint"],
                               font=self.fonts["small"], tags=tag)
        label = printable(tile.name) + ("  (you)" if tile.mine else "")
        if tile.detail:
            label += f"  ·  safety code {tile.detail}"
        text = canvas.create_text(x + px(10), y + px(8), anchor="nw", text=label,
                                  fill="#FFFFFF", font=self.fonts["name"], tags=tag)
        x1, y1, x2, y2 = tile.label = canvas.bbox(text)
        back = canvas.create_rectangle(x1 - px(6), y1 - px(3), x2 + px(6), y2 + px(3),
                                       fill=CALL_LABEL, outline="", tags=tag)
        canvas.tag_raise(text, back)
        if self.selected is not None and tile.name == self.selected and \
                (tile.mine == (self.selected == self.me)):
            canvas.create_rectangle(x + 1, y + 1, x + w - 1, y + h - 1, outline=COLOURS["accent"],
                                    width=px(3), tags=tag)
        self._draw_speaking(tile)

    def _draw_speaking(self, tile: Tile) -> None:
        """The speaking indicator of `tile`, drawn or taken away: a green
        ring on a dark one (so it shows on any picture), inside the
        selection's, and a green dot right of the name."""
        canvas, px = self.canvas, self.look.px
        tag = f"speaking:{id(tile)}"
        tags = (tag, f"tile:{id(tile)}")    # the tile's too: a redraw of it takes them
        canvas.delete(tag)
        if not tile.speaking:
            return
        x, y, w, h = tile.box
        inset = px(5)
        for colour, width in ((CALL_LABEL, px(6)), (SPEAKING_COLOUR, px(3))):
            canvas.create_rectangle(x + inset, y + inset, x + w - inset, y + h - inset,
                                    outline=colour, width=width, tags=tags)
        _x1, y1, x2, y2 = tile.label
        r, cx, cy = px(5), x2 + px(16), (y1 + y2) / 2
        canvas.create_oval(cx - r, cy - r, cx + r, cy + r, fill=SPEAKING_COLOUR, outline="",
                           tags=tags)

    def _refresh_voice(self) -> None:
        """Light the tiles of who speaks now (held SPEAKING_HOLD_S through
        the gaps between words), and show or hide the headphones line."""
        now = time.monotonic()
        levels = self.levels()
        for tile in self.tiles:
            if levels.get(tile.name, LEVEL_FLOOR_DBFS) > SPEAKING_DBFS:
                tile.loud_at = now
            speaking = now - tile.loud_at < SPEAKING_HOLD_S
            if speaking != tile.speaking:
                tile.speaking = speaking
                self._draw_speaking(tile)
                if self.trace.enabled:      # on screen (XSync) before it is said
                    self.canvas.update_idletasks()
                    self.trace("tile_speaking", name=tile.name, mine=tile.mine,
                               speaking=speaking)
        hint = self.headphones()
        if hint != self.hint_shown:
            self.hint_shown = hint
            self.window[(_CALL, "hint")].update(visible=hint)
            if self.trace.enabled:
                self.window.TKroot.update_idletasks()
            self.trace("call_hint", shown=hint, text=HEADPHONES_HINT if hint else "",
                       box=_screen_box(self.window[(_CALL, "hint")].Widget))

    def refresh(self) -> int:
        """Show each tile's newest frame, if it is new, and who speaks;
        returns how many frames."""
        import cv2
        self._refresh_voice()
        shown = 0
        for tile in self.tiles:
            serial, frame = self.frames(tile.name, tile.mine)
            if serial == tile.serial:
                continue
            tile.serial = serial
            if frame is None:
                if tile.showing:
                    tile.showing = False
                    self._draw_tile(tile)
                continue
            _x, _y, w, h = tile.box
            rgb = cv2.cvtColor(cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA),
                               cv2.COLOR_BGR2RGB)
            tile.photo.configure(data=b"P6 %d %d 255\n" % (w, h) + rgb.tobytes(),
                                 format="ppm", width=w, height=h)
            if not tile.showing:
                tile.showing = True
                self._draw_tile(tile)
            shown += 1
            if self.trace.enabled:          # on screen (XSync) before it is said
                self.canvas.update_idletasks()
                self.trace("tile_frame", name=tile.name, mine=tile.mine, serial=serial)
        return shown

    # --- picking a tile ---

    def _on_click(self, event: Any) -> None:
        """Picking a tile takes the keyboard too, so that ESC and Backspace
        reach this window (as a window manager would give it; without one,
        the focus would stay in the chat window where it was last set)."""
        self.canvas.focus_set()
        for tile in self.tiles:
            x, y, w, h = tile.box
            if x <= event.x < x + w and y <= event.y < y + h:
                self.select(tile.name if not tile.mine else self.me)
                return

    def select(self, name: str | None) -> None:
        self.selected = name
        for tile in self.tiles:
            self._draw_tile(tile)
        self.trace("call_selected", name=name)

    def picked_peer(self) -> str | None:
        """The peer whose tile is selected (None: none, or our own)."""
        return self.selected if self.selected in self.peers and self.selected != self.me \
            else None

    def own_tile_picked(self) -> bool:
        return self.selected == self.me

    # --- for the tests ---

    def _trace_tiles(self) -> None:
        if not self.trace.enabled:
            return
        self.window.TKroot.update_idletasks()
        origin = (self.canvas.winfo_rootx(), self.canvas.winfo_rooty())
        root = self.window.TKroot
        self.trace("window", name="call", xid=int(root.wm_frame(), 16), box=_screen_box(root),
                   min=list(root.wm_minsize()), path=str(root),    # for Tk's send
                   interp=str(root.tk.call("tk", "appname")),
                   tiles=[{"name": t.name, "mine": t.mine, "detail": t.detail,
                           "speaking": t.speaking,
                           "box": [origin[0] + t.box[0], origin[1] + t.box[1],
                                   t.box[2], t.box[3]]} for t in self.tiles],
                   hint=self.hint_shown,
                   elements={name: _screen_box(self.window[(_CALL, name)].Widget)
                             for name in ("mute", "camera", "hangup", "end", "tiles",
                                          "status")})

    def close(self) -> None:
        self.window.close()
        self.trace("call_window_closed")


class CallWindows:
    """The app's one call window, opened by the first link and closed when
    the last one ends (or by a person: that hangs up everything)."""

    def __init__(self) -> None:
        self.window: CallWindow | None = None
        self.refreshed = 0.0                # monotonic time of the last refresh
        self.trouble = ""                   # a device problem in this call, said

    @property
    def windows(self) -> list[Any]:
        return [self.window.window] if self.window is not None else []

    def close_all(self) -> None:
        if self.window is not None:
            self.window.close()
            self.window = None
        self.trouble = ""


# =============================================================================
# 30. GUI PLUMBING: settings, the bridge from the core, opening files, phases
# =============================================================================
# What the app (next section) stands on: the settings remembered between
# runs, GuiBridge (the core's thread reaches the window only through it,
# as `window.write_event_value(("-NET-", type), event)`), handing a file
# to the system's opener, the Phase the app is in, with the moves it
# may make, and the file dialog's setup and the sentences a refused join
# shows. No window is drawn here.

# --- Settings remembered between runs ----------------------------------------

_SETTINGS_KEYS = ("room", "user", "address", "ask_above", "theme", "sound")
_SETTINGS_MAX_CHARS = 256


def settings_path(platform: str | None = None,
                  environ: typing.Mapping[str, str] | None = None,
                  home: Path | None = None) -> Path:
    """Where the launcher remembers the last Room ID, User ID and address,
    and the window its theme and whether notifications make a sound."""
    return config_dir(platform, environ, home) / "settings.json"


def load_settings(path: Path) -> dict[str, str]:
    """The remembered fields; {} (never an exception) for a missing,
    unreadable or corrupt file. Only short strings of known keys survive."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {key: value for key, value in data.items() if key in _SETTINGS_KEYS
            and isinstance(value, str) and len(value) <= _SETTINGS_MAX_CHARS}


def window_ask_above(flag: int | None, setting: str, default: int = GUI_ASK_ABOVE) -> int:
    """The size above which the window asks before a file comes: the
    --ask-above flag, else the setting ("100M", "never"), else `default`.
    "never" is the largest size: the window still holds files for its word."""
    if flag is not None:
        return flag
    if setting.strip().casefold() == "never":
        return 2 ** 63
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", setting, re.IGNORECASE)
    if not match:
        return default
    return int(match.group(1)) * 1024 ** " KMGT".index(match.group(2).upper() or " ")


def save_settings(path: Path, settings: dict[str, str]) -> bool:
    """Write the settings atomically (a crash leaves the old file or the new
    one, never half of one). False, logged, if the disk says no."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        part.write_text(json.dumps(settings, ensure_ascii=False, indent=1), encoding="utf-8")
        os.replace(part, path)
        return True
    except OSError as exc:
        log.warning("can't save settings to %s: %s", path, exc)
        return False


# --- From the core's thread to the window ------------------------------------

class GuiBridge:
    """Turns core callbacks into window events; the only GUI object the core
    thread uses.

    Every event goes to one window, the launcher, which lives as long as the
    program (hidden while you chat): so no event is lost while the chat
    window opens or closes. The app's read loop takes it from there.
    `detach()` is called only after the core has stopped, so no thread can
    be posting at that moment.
    """

    def __init__(self, window: Any) -> None:
        self._window = window

    def on_event(self, event: dict) -> None:        # runs on the core thread
        self.post((NET_EVENT, event["type"]), event)

    def post(self, key: tuple, value: Any = None) -> None:
        """Queue `key` with `value` for the read loop; any thread."""
        window = self._window
        if window is not None:
            window.write_event_value(key, value)

    def report(self, what: str, future: Any, describe: Callable[[Any], Any] | None = None,
               quiet: bool = False) -> None:
        """When `future` (a core command) is done, post ("-CORE-", what) with
        its result (`describe`d) unless `quiet`, or ("-CORE-", "failed") with
        the error; nothing if it was cancelled (the core stopped: we are
        closing). The callback runs on the core's thread, or right here if
        the future is already done: both may post."""
        def done(f: Any) -> None:
            if f.cancelled():
                return
            if f.exception() is not None:
                self.post((CORE_EVENT, "failed"), f"{what}: {f.exception()}")
            elif not quiet:
                self.post((CORE_EVENT, what), describe(f.result()) if describe else f.result())
        future.add_done_callback(done)

    def detach(self) -> None:
        self._window = None


def open_with_os(path: str | Path) -> None:
    """Open a file or folder with the desktop's default application and
    return at once. Raises OSError if there is no opener."""
    import subprocess  # here: only the window opens files
    if sys.platform.startswith("win"):      # pragma: no cover (Windows only)
        os.startfile(path)
        return
    opener = "open" if sys.platform == "darwin" else "xdg-open"
    if not os.path.exists(path):
        raise OSError(errno.ENOENT, f"{path} is not there any more")
    try:
        subprocess.Popen([opener, str(path)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    except FileNotFoundError:               # the file is there: the opener is not
        raise OSError(errno.ENOENT, f"this system has no {opener} to open files with"
                      + (" (install the xdg-utils package)" if opener == "xdg-open" else "")
                      ) from None


# --- What the app is doing ------------------------------------------------------

class Phase(enum.Enum):
    CHOOSING = "choosing"           # the launcher waits for you
    HOSTING = "hosting"             # starting a host in this process, then joining it
    JOINING = "joining"             # connecting and logging in
    CHATTING = "chatting"           # in a room
    ENDED = "ended"                 # the connection ended; the chat window says why
    STOPPING = "stopping"           # closing: windows hidden, the core stopping
    STOPPED = "stopped"             # the loop is over


# Where the app may go from each phase. A move not listed is a bug in the
# handlers (IllegalMove), not something a person or the network can cause.
PHASE_MOVES: dict[Phase, frozenset[Phase]] = {
    Phase.CHOOSING: frozenset({Phase.HOSTING, Phase.JOINING, Phase.STOPPING}),
    Phase.HOSTING: frozenset({Phase.CHOOSING, Phase.JOINING, Phase.STOPPING}),
    Phase.JOINING: frozenset({Phase.CHOOSING, Phase.CHATTING, Phase.STOPPING}),
    Phase.CHATTING: frozenset({Phase.ENDED, Phase.CHOOSING, Phase.STOPPING}),
    Phase.ENDED: frozenset({Phase.CHOOSING, Phase.STOPPING}),
    Phase.STOPPING: frozenset({Phase.STOPPED}),
    Phase.STOPPED: frozenset(),
}
IN_ROOM = frozenset({Phase.CHATTING, Phase.ENDED})   # the phases with a chat window


class IllegalMove(RuntimeError):
    """The app tried a phase change PHASE_MOVES forbids: a bug here."""


class LoopStats:
    """How long the loop waits in read and spends in handlers (for the trace)."""

    def __init__(self) -> None:
        self.reads: list[float] = []
        self.handlers: list[float] = []

    def note(self, read_s: float, handler_s: float) -> None:
        self.reads.append(read_s)
        self.handlers.append(handler_s)

    def summary(self) -> dict:
        """Milliseconds (median, 99th percentile, max) since the last summary."""
        def ms(values: list[float]) -> dict:
            ordered = sorted(values) or [0.0]

            def at(q: float) -> float:
                return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)
            return {"p50": at(0.5), "p99": at(0.99), "max": at(1.0)}
        out = {"count": len(self.reads), "read_ms": ms(self.reads),
               "handler_ms": ms(self.handlers)}
        self.reads, self.handlers = [], []
        return out


# --- Dialogs and sentences the app shows ---------------------------------------

def _trace_dialog_when_ready(parent: Any, trace: GuiTrace) -> None:
    """Test hook: once Tk's file dialog (a child of `parent`) is on screen
    with its file name entry focused, so that typed keys land there, say
    so in the trace with where it is. Polls with Tk's own timer, which runs
    under the dialog's modal loop."""
    def check(tries: int = 0) -> None:
        for child in parent.tk.splitlist(parent.tk.call("winfo", "children", parent)):
            if "__tk_filedialog" in child and parent.tk.call("winfo", "viewable", child) \
                    and str(parent.tk.call("focus", "-lastfor", child)).endswith(".ent"):
                box = [int(parent.tk.call("winfo", what, child))
                       for what in ("rootx", "rooty", "width", "height")]
                trace("dialog", ready=True, box=box, folder=str(parent.tk.call(
                    "set", "::tk::dialog::file::__tk_filedialog(selectPath)")))
                parent.after(_DIALOG_POLL_MS, listed, child)
                return
        if tries < _DIALOG_POLLS:
            parent.after(_DIALOG_POLL_MS, check, tries + 1)

    def listed(child: str, tries: int = 0) -> None:
        """Then, once the dialog lists the folder, what it lists."""
        icons = f"{child}.contents.icons"
        if not parent.tk.call("winfo", "exists", icons):
            return                          # closed already (or not Tk's own dialog)
        count = int(parent.tk.call(icons, "index", "end"))
        if count:
            trace("dialog_listed", names=[str(parent.tk.call(icons, "get", index))
                                          for index in range(count)])
        elif tries < _DIALOG_POLLS:
            parent.after(_DIALOG_POLL_MS, listed, child, tries + 1)
    parent.after(_DIALOG_POLL_MS, check)


def _hide_dot_folders(root: Any) -> None:
    """Tk's own file dialog (X11; Windows and macOS use the system's) lists
    dot folders unless its namespace says otherwise: load the dialog's code
    (asking for an option it lacks fails before any window opens), then
    hide them and show its "Show hidden" box (tkfbox.tcl's showHiddenVar,
    showHiddenBtn)."""
    import tkinter
    try:
        root.tk.call("tk_getOpenFile", "-no-such-option")
    except tkinter.TclError:
        pass                                # expected: the code is loaded now
    if root.tk.call("namespace", "exists", "::tk::dialog::file"):
        root.tk.call("set", "::tk::dialog::file::showHiddenBtn", "1")
        root.tk.call("set", "::tk::dialog::file::showHiddenVar", "0")


_DIALOG_POLL_MS = 50
_DIALOG_POLLS = 400                 # 20 s of looking, then give up


# What the launcher says when a join fails, by error code; the host's own
# sentence is kept where it says more than we could.
_JOIN_ERRORS: dict[str, Callable[[str], str]] = {
    "user_taken": lambda m: "That User ID is already in this room. Pick another one.",
    "version_mismatch": lambda m: "This host runs a different version of chatroom: "
                                  + _sentence(m),
    "host_unreachable": _sentence,
    "wrong_password": lambda m: "This room is protected: type its password in Password, "
                                "and Join again." if "needs its password" in m
                                else _sentence(m),
    "room_not_protected": lambda m: "This room is open to everyone (it has no password): "
                                    "empty Password to join it, or pick another Room ID.",
}


# =============================================================================
# 31. GUI APP: the one core, the windows, the one read loop
# =============================================================================
# GuiApp owns one ClientCore, the launcher (which lives as long as the
# program and receives every core event), the chat window while in a room,
# the call window, and the loop that reads them all. The core reaches it
# through GuiBridge (GUI PLUMBING); commands go the other way as ClientCore
# methods that return a future at once, and what a future brings back (a
# port, a refusal) comes home as a ("-CORE-", ...) event from a
# done-callback. So no handler here touches a socket, sleeps, or waits on
# a future. Which handler runs is a table from event key to method; what
# the app is doing is one Phase, moved only along PHASE_MOVES.

class GuiApp:
    """The desktop program: one ClientCore, the launcher, the chat window
    (while in a room), the call windows (later), and the loop that reads
    them all.

    Every event reaches one handler through two tables: `posted` for events
    written with write_event_value (from the core, a done-callback, or a
    canvas click), which get the posted value, and `clicked` for element
    events, which get the window's values. A handler that needs the chat
    window is wrapped by `_in_room`, which passes it the window and skips it
    when there is none. What a typed line does is `typed`, by Command.
    """

    def __init__(self, args: argparse.Namespace, limits: Limits, media: MediaOptions,
                 look: Look, settings_file: Path, trace: GuiTrace) -> None:
        import PySimpleGUI as sg
        self.sg = sg
        self.args = args
        self.limits = limits
        self.look = look
        self.trace = trace
        self.settings_file = settings_file
        self.images = Images()
        prefill = load_settings(settings_file)
        prefill.update({key: value for key, value in (
            ("room", args.room), ("user", args.user), ("address", args.server),
            ("password", room_password(args))) if value})
        self.launcher = Launcher(look, self.images, prefill, trace)
        self.bridge = GuiBridge(self.launcher.window)
        self.core = ClientCore(self.bridge.on_event, limits, args.downloads, media,
                               args.state_dir or config_dir(), known_hosts_from(args),
                               args.state_dir or config_dir())
        self.core.interface = args.interface
        # Files larger than this wait for Accept or Decline: --ask-above,
        # else settings.json's "ask_above" ("100M", or "never"), else 100 MiB.
        # "never" still holds files for an answer, which comes at once: the
        # hello's `ask` is fixed for a connection, the setting may change.
        self.ask_above = window_ask_above(args.ask_above, prefill.get("ask_above", ""),
                                          limits.gui_ask_above)
        self.core.files.ask_above = self.ask_above   # before the core's loop runs
        # The chat window: set on entering CHATTING, kept while ENDED and,
        # hidden, through STOPPING; closed on leaving for the launcher or on
        # STOPPED. Only _set_phase and finish() change it.
        self.chat: ChatWindow | None = None
        self.calls = CallWindows()
        self.phase = Phase.CHOOSING
        self.hosted_port: int | None = None  # our in-process host, once it listens
        self.joining: dict = {}             # what the launcher asked for
        self.stop_deadline = 0.0
        self.stats = LoopStats()
        self._invites_ticked = 0.0          # when ringing cards were last counted down
        self.confirm: ConfirmWindow | None = None   # "close anyway?" while it asks
        self.notifier = Notifier(trace, sound=prefill.get("sound") == "on")
        self._paths: dict[str, str] = {}    # peer: "direct" or "relay", as last told
        in_room = self._in_room
        self.posted: dict[tuple, Callable[[Any], None]] = {
            (NET_EVENT, "hosts"): self.launcher.show_hosts,
            (NET_EVENT, "listening"): self.on_listening,
            (NET_EVENT, "ready"): self.on_ready,
            (NET_EVENT, "reconnecting"): in_room(ChatWindow.reconnecting),
            (NET_EVENT, "resumed"): in_room(ChatWindow.back),
            (NET_EVENT, "error"): self.on_error,
            (NET_EVENT, "closed"): self.on_closed,
            (NET_EVENT, "host_key"): self.on_notice_to_keep,
            (NET_EVENT, "warning"): self.on_notice_to_keep,
            (NET_EVENT, "message"): in_room(ChatWindow.on_message),
            (NET_EVENT, "system"): in_room(ChatWindow.on_system),
            (NET_EVENT, "help"): in_room(ChatWindow.on_help),
            (NET_EVENT, "members"): in_room(ChatWindow.on_members),
            (NET_EVENT, "file_offer"): in_room(ChatWindow.on_file_offer),
            (NET_EVENT, "file_progress"): in_room(ChatWindow.on_file_progress),
            (NET_EVENT, "file_received"): in_room(ChatWindow.on_file_received),
            (NET_EVENT, "file_sent"): in_room(ChatWindow.on_file_sent),
            (NET_EVENT, "file_delivered"): in_room(ChatWindow.on_file_delivered),
            (NET_EVENT, "file_failed"): in_room(ChatWindow.on_file_failed),
            (NET_EVENT, "call_invite"): self.on_call_invite,
            (NET_EVENT, "call_missed"): self.on_call_missed,
            (NET_EVENT, "call_failed"): in_room(ChatWindow.on_call_event),
            (NET_EVENT, "call_connected"): self.on_call_connected,
            (NET_EVENT, "call_ended"): self.on_call_ended,
            (NET_EVENT, "media_state"): self.on_media_state,
            (NET_EVENT, "media_stats"): self.on_media_stats,
            (_CHAT, "callback"): in_room(self.on_call_back),
            (_CHAT, "decline"): in_room(self.on_decline_click),
            (CORE_EVENT, "hosted"): self.on_hosted,
            (CORE_EVENT, "said"): in_room(self.on_said),
            (CORE_EVENT, "failed"): self.on_failed,
            (CORE_EVENT, "stopped"): lambda _value: self.finish(),
            (_CHAT, "pick"): in_room(ChatWindow.pick),
            (_CHAT, "drop"): in_room(self.on_drop),
            (_CHAT, "open"): self.on_open,
            (_CHAT, "folder"): self.on_open,
            (_CHAT, "file_accept"): in_room(self.on_file_accept),
            (_CHAT, "file_decline"): in_room(self.on_file_decline),
            (_CHAT, "file_cancel"): in_room(self.on_file_cancel),
        }
        self.clicked: dict[Any, Callable[[dict], None]] = {
            (_ROOM, "join"): self.on_join,
            (_ROOM, "host"): self.on_host,
            (_ROOM, "accept_key"): self.on_accept_key,
            (_ROOM, "hosts"): self.on_pick_host,
            ((_ROOM, "hosts"), "double"): self.on_double_click_host,
            (_CHAT, "send"): in_room(self.on_send),
            (_CHAT, "file"): in_room(self.on_send_file_button),
            (_CHAT, "video"): in_room(self.on_video_button),
            (_CHAT, "leave"): in_room(self.on_leave),
            (_CHAT, "room"): in_room(lambda chat, _values: chat.pick(None)),
            (_CHAT, "theme"): lambda values: self.toggle_theme(),
            (_CHAT, "sound"): in_room(self.toggle_sound),
            (_CHAT, "ask"): in_room(self.next_ask_above),
            (_ROOM, "theme"): lambda values: self.toggle_theme(),
            (_CALL, "mute"): lambda values: self._quietly("mute", self.core.set_media(
                muted=not self.core.calls.media.muted)),
            (_CALL, "camera"): lambda values: self._quietly("camera", self.core.set_media(
                video=not self.core.calls.media.camera_on)),
            (_CALL, "hangup"): lambda values: self.hang_up_picked(),
            (_CALL, "escape"): lambda values: self.hang_up_picked(),
            (_CALL, "end"): lambda values: self.end_calls(),
            (_CALL, "backspace"): lambda values: self.end_calls(only_if_own_tile=True),
            (_CONFIRM, "yes"): lambda values: self.quit(confirmed=True),
            (_CONFIRM, "no"): lambda values: self._drop_confirm(),
            (_CALL, "answer"): lambda values: self.answer_in_call_window(),
            (_CALL, "decline"): lambda values: self.decline_in_call_window(),
        }
        for kind in ("message", "call_invite"):     # a desktop notification too
            self.posted[(NET_EVENT, kind)] = self._notifying(self.posted[(NET_EVENT, kind)])
        self.typed: dict[type[Command], Callable[[ChatWindow, Any], None]] = {
            ChatLine: lambda chat, command: self.say(command.text, chat.talking_to),
            PrivateLine: self.on_private_line,
            ListMembers: lambda chat, command: self._quietly("who", self.core.who()),
            Quit: lambda chat, command: self.on_leave(chat, {}),
            SendFile: self.on_send_file,
            AnswerFile: lambda chat, command: self._quietly("answer", answer_file(
                self.core, command)),
            CancelFile: lambda chat, command: self._quietly("cancel", self.core.cancel_file(
                command.transfer, command.direction)),
            CallUser: lambda chat, command: self._call(chat, command.line,
                                                       self.core.call(command.user)),
            CallAddress: lambda chat, command: self._call(chat, command.line,
                                                          self.core.call_address(
                                                              command.address,
                                                              command.listen, command.port)),
            DeclineCall: lambda chat, command: self._call(chat, command.line,
                                                          self.core.decline(command.user)),
            HangUp: lambda chat, command: self._call(chat, command.line,
                                                     self.core.hang_up(command.user)),
            Mute: lambda chat, command: self._call(chat, command.line,
                                                   self.core.set_media(muted=command.muted)),
            Camera: lambda chat, command: self._call(chat, command.line,
                                                     self.core.set_media(video=command.on)),
            Mistyped: self.on_mistyped,
        }

    # --- the loop ---

    def run(self) -> int:
        """Show the launcher and handle events until the last window closes."""
        self.core.start()
        self._quietly("watch", self.core.watch_hosts(self.args.interface))
        self.launcher.trace_layout()
        self.trace("phase", phase=self.phase.value)
        while self.phase is not Phase.STOPPED:
            started = time.perf_counter()
            window, event, values = self.sg.read_all_windows(timeout=self._read_timeout())
            read = time.perf_counter()
            self.sg.Window._window_that_exited = None   # see _dispatch_swallowed
            self.dispatch(event, values, window)
            self._dispatch_swallowed()
            self._keep_time()
            if self.trace.enabled:
                self.stats.note(read - started, time.perf_counter() - read)
                if len(self.stats.reads) >= _LOOP_STATS_EVERY:
                    self.trace("loop", **self.stats.summary())
        if self.trace.enabled:
            self.trace("loop", **self.stats.summary())
        return EXIT_OK

    def _dispatch_swallowed(self) -> None:
        """Dispatch a click that came while a handler let Tk run (closing a
        window runs Tk's update, which handles what is waiting). PySimpleGUI
        notes such a click in one slot, the window that ended Tk's loop,
        which read_all_windows has already looked at, and Tk forgets the
        request to end its loop: without this the click is lost. (Closes
        and the core's events are queued, and wait for the next read.)"""
        for _ in range(_SWALLOWED_MAX):
            late = self.sg.Window._window_that_exited
            if late is None or late.TKroot is None or late.XFound:
                return
            self.sg.Window._window_that_exited = None
            self.sg.PySimpleGUI._BuildResults(late, False, late)
            event, values = late.ReturnValues
            if event is not None:           # None: nothing was clicked after all
                self.dispatch(event, values, late)

    def _read_timeout(self) -> int | None:
        """How long the loop may wait for an event: briefly while stopping,
        a frame's time while a call window shows video, a second while a
        call rings, else for ever."""
        if self.phase is Phase.STOPPING:
            return _STOPPING_POLL_MS
        if self.calls.window is not None:
            return round(1000 * CALL_REFRESH_S)
        if self.chat is not None and (self.chat.invites or self.chat.pending):
            return _RINGING_POLL_MS
        return None

    def _keep_time(self) -> None:
        """What runs on the clock: new frames for the call window, the
        countdown of ringing calls (after any event, so a flood of chat
        can't starve them)."""
        now = time.monotonic()
        if self.calls.window is not None and now - self.calls.refreshed >= CALL_REFRESH_S:
            self.calls.refreshed = now
            self.calls.window.refresh()
        if self.chat is not None and (self.chat.invites or self.chat.pending) and \
                now - self._invites_ticked >= _RINGING_POLL_MS / 1000:
            self._invites_ticked = now
            self.chat.tick_invites()
            self.chat.unconfirmed(_UNCONFIRMED_S)

    def dispatch(self, event: Any, values: Any, window: Any = None) -> None:
        """Hand one event to its handler."""
        if event in (self.sg.WIN_CLOSED, self.sg.WINDOW_CLOSE_ATTEMPTED_EVENT):
            if self.calls.window is not None and window is self.calls.window.window:
                self.end_calls()            # closing the call window is a hang-up
            elif self.confirm is not None and window is self.confirm.window:
                self._drop_confirm()        # closing the question: don't close
            else:
                self.quit()
        elif event == self.sg.TIMEOUT_EVENT:
            if self.phase is Phase.STOPPING and time.monotonic() > self.stop_deadline:
                self.finish()               # the core didn't stop in time: go anyway
        elif event in self.posted:
            value = values[event]
            if self.trace.enabled and event[0] == NET_EVENT:
                self.trace("event", event=value)
            self.posted[event](value)
        elif event in self.clicked:
            self.clicked[event](values)

    def _in_room(self, handler: Callable[[ChatWindow, Any], None]) -> Callable[[Any], None]:
        """`handler`, given the chat window, for an event that needs it;
        when there is no chat window (it closed, or never opened), the
        event is late and is dropped."""
        def with_chat(value: Any) -> None:
            if self.chat is not None:
                handler(self.chat, value)
        return with_chat

    def _set_phase(self, phase: Phase, chat: ChatWindow | None = None) -> None:
        """Move to `phase` (PHASE_MOVES says where the app may go). Entering
        CHATTING takes the new chat window; leaving the room for the
        launcher closes it (STOPPING keeps it, hidden, until STOPPED)."""
        if phase not in PHASE_MOVES[self.phase]:
            raise IllegalMove(f"the window can't go from {self.phase.value} to {phase.value}")
        if phase is Phase.CHATTING:
            self.chat = chat
        elif phase not in IN_ROOM and phase is not Phase.STOPPING and self.chat is not None:
            self.chat.close()
            self.chat = None
        self.phase = phase
        self.trace("phase", phase=phase.value)

    def _quietly(self, what: str, future: Any) -> None:
        """A command whose outcome arrives as events: only a crash is reported."""
        self.bridge.report(what, future, quiet=True)

    # --- the launcher ---

    def on_pick_host(self, values: dict) -> None:
        for index in values[(_ROOM, "hosts")][:1]:
            self.launcher.use_row(index)

    def on_double_click_host(self, values: dict) -> None:
        self.on_pick_host(values)
        self.on_join(values)

    def on_join(self, values: dict) -> None:
        if self.phase is not Phase.CHOOSING:
            return
        form = self.launcher.form()
        if form is not None:
            self.joining = {"address": self.launcher.typed_address()}
            self.join(*form)

    def on_accept_key(self, values: dict) -> None:
        """"Accept the new key": the same join again, taking the key shown
        (that one only: a third key would be refused again)."""
        changed, where = self.launcher.changed_key, self.joining.get("where")
        if self.phase is Phase.CHOOSING and changed is not None and where is not None:
            hosts, port, room, user, password = where
            self.join(hosts, port, room, user, password, accept_key=changed["fingerprint"])

    def join(self, hosts: str | list[str], port: int, room: str, user: str,
             password: str = "", accept_key: str = "") -> None:
        self.joining.update(room=room, user=user, where=(hosts, port, room, user, password))
        self.launcher.key_changed(None)
        self._set_phase(Phase.JOINING)
        self.launcher.busy(True)
        first = hosts if isinstance(hosts, str) else hosts[0]
        self.launcher.status(f"Joining {room} at {address_text(first, port)}...")
        listed = next((h for h in self.launcher.hosts
                       if h["address"] == first and h["port"] == port), None)
        self._quietly("join", self.core.join(
            hosts, port, room, user, found_on_lan=listed is not None, password=password,
            host_name=listed["name"] if listed else "", accept_key=accept_key))

    def on_host(self, values: dict) -> None:
        """"Host a room here": start a host in this process, then join it."""
        if self.phase is not Phase.CHOOSING:
            return
        ids = self.launcher.ids()
        if ids is None:
            return
        self.joining = {"address": self.launcher.typed_address(), "ids": ids}
        if self.hosted_port is not None:    # still hosting from before: join again
            self.join(self.args.interface or "127.0.0.1", self.hosted_port, *ids,
                      self.launcher.password())
            return
        self._set_phase(Phase.HOSTING)
        self.launcher.busy(True)
        self.launcher.status("Starting a host on this computer...")
        self.bridge.report("hosted", self.core.start_host(
            port=self.args.port, name=self.args.name, interface=self.args.interface,
            advertise=not self.args.no_advertise))

    def on_listening(self, event: dict) -> None:
        self.trace("listening", port=event["port"], name=event["name"])

    def on_hosted(self, port: int | None) -> None:
        """The in-process host listens on `port` (None: it could not start,
        and an `error` said why)."""
        if self.phase is not Phase.HOSTING:
            return
        if port is None:
            self._set_phase(Phase.CHOOSING)
            self.launcher.busy(False)
            return
        self.hosted_port = port
        # The host listens on --interface, or on every address: reach it by
        # loopback then, which works with no network at all.
        room, user = self.joining["ids"]
        self.join(self.args.interface or "127.0.0.1", port, room, user,
                  self.launcher.password())

    def on_ready(self, event: dict) -> None:
        if self.phase is Phase.CHATTING and self.chat is not None:
            self.chat.back(event)           # back after a drop, to a host that forgot us
            return
        if self.phase is not Phase.JOINING:
            return
        settings = {"room": event["room"], "user": event["user"]}
        if self.joining.get("address"):
            settings["address"] = self.joining["address"]
        self.remember(settings, replace=("room", "user", "address"))
        chat = ChatWindow(self.look, self.images, event, self.trace,
                          self.limits.gui_max_shown, self.notifier.sound, self.ask_above)
        self.launcher.window.hide()
        self.launcher.busy(False)
        self.launcher.status("")
        self._set_phase(Phase.CHATTING, chat)
        if self.hosted_port is not None:
            chat.note(f"You are hosting this room on port {self.hosted_port}; "
                      "people on your network can find it. Closing this window "
                      "ends it for everyone.")
        for notice in self.joining.pop("notices", []):  # a key met, or --insecure
            chat.note(_sentence(notice["message"]),
                      "error" if notice["type"] == "warning" else "info")

    def _notifying(self, handler: Callable[[Any], None]) -> Callable[[Any], None]:
        """`handler`, then a desktop notification if the event is a message
        from someone else, live, or a call for you, and no window of ours
        has the focus (the person is looking elsewhere)."""
        def handle(event: dict) -> None:
            handler(event)
            chat = self.chat
            if chat is None or self.phase is not Phase.CHATTING:
                return
            if event["type"] == "message":
                if event.get("history") or id_key(event["from"]) == id_key(chat.me):
                    return
                title = f"{printable(event['from'])} · {printable(chat.room)}"
                body = printable_block(event["text"])
            else:
                title, body = f"{printable(event['from'])} is calling you", \
                    "Call back in the chat window to answer."
            away = all(window.TKroot.focus_displayof() is None for window in self.windows()
                       if window.TKroot is not None)
            self.trace("attention", away=away)
            if away:
                self.notifier.notify(chat.window.TKroot, title, body)
        return handle

    def toggle_sound(self, chat: ChatWindow, values: dict) -> None:
        """Sound on or off with each desktop notification; remembered."""
        self.notifier.sound = not self.notifier.sound
        chat.window[(_CHAT, "sound")].update(sound_button_text(self.notifier.sound))
        self.remember({"sound": "on" if self.notifier.sound else "off"})
        self.trace("sound", on=self.notifier.sound)

    def next_ask_above(self, chat: ChatWindow, values: dict) -> None:
        """The Ask button: the next size above which files wait for
        Accept or Decline (every file, 10 MB, 100 MB, 1 GB, never); from
        the next offer on, and remembered."""
        self.ask_above, setting = next_ask_choice(self.ask_above)
        self._quietly("ask_above", self.core.set_ask_above(self.ask_above))
        chat.window[(_CHAT, "ask")].update(ask_button_text(self.ask_above))
        self.remember({"ask_above": setting})
        self.trace("ask_above", size=self.ask_above, setting=setting)

    def remember(self, changes: dict[str, str], replace: Iterable[str] = ()) -> None:
        """Save `changes` in the settings, keeping what else is there
        (the keys in `replace` go unless `changes` has them)."""
        kept = {key: value for key, value in load_settings(self.settings_file).items()
                if key not in replace}
        save_settings(self.settings_file, {**kept, **changes})

    def toggle_theme(self) -> None:
        """The theme button (launcher or chat window): the other palette,
        now, in every window, and remembered for next time."""
        theme = "light" if PALETTES["dark"] == COLOURS else "dark"
        old = use_palette(theme)
        apply_theme(self.look)              # for windows opened from now on
        for window in self.windows():
            recolour_widgets(window.TKroot, old, COLOURS)
        self.launcher.recolour()
        if self.chat is not None:
            self.chat.recolour()
        self.remember({"theme": theme})
        self.trace("theme", theme=theme)
        self.launcher.trace_layout()

    def on_notice_to_keep(self, event: dict) -> None:
        """`host_key` (a key pinned, or accepted) and `warning` (--insecure)
        come while joining: the chat window says them when it opens."""
        if self.chat is not None:
            self.chat.note(_sentence(event["message"]),
                           "error" if event["type"] == "warning" else "info")
        else:
            self.joining.setdefault("notices", []).append(event)

    def on_error(self, event: dict) -> None:
        if event["code"] in DEVICE_ERRORS:  # also in the call window (which may
            self.calls.trouble = _sentence(event["message"])   # open just after)
            self._say_who()
        if self.phase is Phase.JOINING and event["code"] == "host_key_changed":
            self.launcher.error("Refused: this host's key has changed.")
            self.launcher.key_changed(event)
        elif self.phase is Phase.JOINING:
            self.launcher.error(_JOIN_ERRORS.get(event["code"], _sentence)(event["message"]))
        elif self.phase in (Phase.HOSTING, Phase.CHOOSING):   # no host, or no LAN watch
            self.launcher.error(_sentence(event["message"]))
        elif self.chat is not None:
            self.chat.on_error(event)

    def on_closed(self, event: dict) -> None:
        reason = event["reason"]
        if self.phase is Phase.JOINING:
            self._set_phase(Phase.CHOOSING)
            self.launcher.busy(False)
            if reason not in ("refused", "unreachable"):   # those had an `error` first
                self.launcher.error(CLOSED_REASONS.get(reason, reason))
        elif self.phase is Phase.CHATTING and self.chat is not None:
            if reason == "quit":
                self.back_to_launcher()
            else:
                self._set_phase(Phase.ENDED)
                self.chat.ended(reason)

    # --- the chat window ---

    def on_send(self, chat: ChatWindow, values: dict) -> None:
        """Enter or Send: a line of chat, or a command as in the terminal."""
        if self.phase is not Phase.CHATTING:
            return
        command = parse_command(chat.take_input())
        if command is not None:
            self.typed[type(command)](chat, command)

    def say(self, text: str, to: str | None = None) -> None:
        """A line to the room, or to `to` alone (the conversation shown)."""
        self.bridge.report("said", self.core.say(text, to or ""),
                           lambda msg_id: (text, msg_id, to))

    def on_private_line(self, chat: ChatWindow, command: PrivateLine) -> None:
        """/msg USER TEXT: to the conversation with USER, and the line there."""
        user = chat.member_named(command.user)
        if id_key(user) != id_key(chat.me):     # (to oneself: the host's error says why)
            chat.pick(user)
        self.say(command.text, user)

    def on_send_file(self, chat: ChatWindow, command: SendFile) -> None:
        """/send PATH: to the conversation on screen (the room, or the
        person of a private one); /send PATH @USER: to USER, and, as /msg
        does, to the conversation with USER, where its card is."""
        to = command.to and chat.member_named(command.to)
        if to and to in chat.members.members and id_key(to) != id_key(chat.me):
            chat.pick(to)
        self.send_file(command.path, to or chat.talking_to)

    def on_said(self, chat: ChatWindow, outcome: tuple[str, str | None, str | None]) -> None:
        text, msg_id, to = outcome
        if msg_id is None:                  # refused: an `error` says why
            chat.restore_input(text)
        else:                               # on its way: shown until the host confirms
            chat.sending(text, msg_id, to)

    def on_mistyped(self, chat: ChatWindow, command: Mistyped) -> None:
        chat.view.add("echo", text=command.line)
        chat.note(_sentence(command.message), "error")

    def send_file(self, path: str, to: str | None) -> None:
        self._quietly("send_file", self.core.send_file(path, to))

    def on_send_file_button(self, chat: ChatWindow, values: dict) -> None:
        """Pick a file in Tk's dialog and send it to whoever the members
        list has picked. The dialog is modal, but Tk runs its own loop under
        it: the window repaints, and core events wait in the queue."""
        if self.phase is not Phase.CHATTING:
            return
        from tkinter import filedialog
        _hide_dot_folders(chat.window.TKroot)
        if self.trace.enabled:
            _trace_dialog_when_ready(chat.window.TKroot, self.trace)
        path = filedialog.askopenfilename(parent=chat.window.TKroot, title="Send a file",
                                          initialdir=str(Path.home()))
        if path:
            self.send_file(path, chat.members.picked)

    def on_drop(self, chat: ChatWindow, paths: list[str]) -> None:
        """Files dropped on the chat window: each goes as Send file would
        send it (to whoever the members list has picked); a folder can't."""
        if self.phase is not Phase.CHATTING:
            return
        self.trace("dropped", paths=paths)
        for path in paths:
            if os.path.isdir(path):
                chat.note(f"{printable(os.path.basename(path) or path)} is a folder: drop "
                          "files (a folder can't be sent).", "error")
            else:
                self.send_file(path, chat.members.picked)

    def _call(self, chat: ChatWindow, line: str, future: Any) -> None:
        """A call command: shown as typed; what follows comes as events."""
        chat.view.add("echo", text=line)
        self._quietly("call", future)

    def on_video_button(self, chat: ChatWindow, values: dict) -> None:
        """Video call: "ip port1 port2" in the input calls that address
        directly; else the member picked in the list is called."""
        if self.phase is not Phase.CHATTING:
            return
        line = chat.take_input().strip()
        if line:                            # "ip p1 p2", or a typed /call or /CHECK
            command = parse_command(line if line.startswith("/") else f"/call {line}")
            if isinstance(command, CallAddress):
                self._call(chat, f"Video call {line}", self.core.call_address(
                    command.address, command.listen, command.port))
            elif isinstance(command, CallUser):
                self._call(chat, f"Video call {command.user}", self.core.call(command.user))
            else:
                why = command.message if isinstance(command, Mistyped) else "not a call"
                chat.view.add("echo", text=f"Video call {line}")
                chat.note(_sentence(f"{why.split('; usage')[0]}: type \"ip port1 port2\", "
                                    "or pick someone in the members list"), "error")
                chat.restore_input(line)
        elif chat.members.picked is not None:
            self._call(chat, f"Video call {chat.members.picked}",
                       self.core.call(chat.members.picked))
        else:
            chat.note("Pick someone in the members list, or type \"ip port1 port2\", "
                      "then press Video call.", "error")

    # --- calls ---

    def on_call_invite(self, event: dict) -> None:
        """Someone calls: a card in the chat, and, in a call, a bar in the
        call window (where a person in a call is looking)."""
        if self.chat is not None:
            self.chat.on_call_invite(event)
        if self.calls.window is not None:
            self.calls.window.ringing(event["from"])

    def on_call_missed(self, event: dict) -> None:
        if self.chat is not None:
            self.chat.on_call_missed(event)
        window = self.calls.window
        if window is not None and window.caller is not None and \
                id_key(window.caller) == id_key(event["from"]):
            window.ringing(None)

    def answer_in_call_window(self) -> None:
        window = self.calls.window
        if window is not None and window.caller is not None:
            caller = window.caller
            window.ringing(None)
            self._quietly("call", self.core.call(caller))

    def decline_in_call_window(self) -> None:
        window = self.calls.window
        if window is not None and window.caller is not None:
            caller = window.caller
            window.ringing(None)
            self._quietly("decline", self.core.decline(caller))
            if self.chat is not None:
                self.chat.invite_over(caller, "declined", "You declined")

    def on_call_back(self, chat: ChatWindow, user: str) -> None:
        """"Call back" on a ringing card: /CHECK them."""
        self._call(chat, f"/CHECK {user}", self.core.call(user))

    def on_file_accept(self, chat: ChatWindow, transfer: int) -> None:
        self.bridge.report("accept", self.core.accept_file(transfer), quiet=True)
        chat.file_answered(transfer, True)

    def on_file_decline(self, chat: ChatWindow, transfer: int) -> None:
        self.bridge.report("decline", self.core.decline_file(transfer), quiet=True)
        chat.file_answered(transfer, False)

    def on_file_cancel(self, chat: ChatWindow, key: tuple[str, int]) -> None:
        """Cancel on a file card: the core tells the other side; the card
        changes with the file_failed that follows."""
        direction, transfer = key
        self.bridge.report("cancel", self.core.cancel_file(transfer, direction), quiet=True)

    def on_decline_click(self, chat: ChatWindow, user: str) -> None:
        self._call(chat, f"/decline {user}", self.core.decline(user))
        chat.invite_over(user, "declined", "You declined")

    def on_call_connected(self, event: dict) -> None:
        """A link is up: a tile for the peer, in the call window (opened for
        the first link)."""
        if self.chat is not None:
            self.chat.on_call_event(event)
            self.chat.invite_over(event["peer"], "answered", "Answered: in a call")
        if self.calls.window is None:
            me = self.chat.me if self.chat is not None else self.joining.get("user", "me")
            media = self.core.calls.media
            self.calls.window = CallWindow(self.look, self.images, me, self.trace,
                                           self._frame_of, media.levels,
                                           lambda: media.needs_headphones)
            self.calls.window.media_state(media.muted, media.camera_on)
        self.calls.window.add(event["peer"], event.get("safety_code") or "")
        if self.calls.window.caller is not None and \
                id_key(self.calls.window.caller) == id_key(event["peer"]):
            self.calls.window.ringing(None)
        self._paths[event["peer"]] = event.get("path") or "direct"
        self._say_who()

    def _say_who(self, before: str = "") -> None:
        """The call window's status line: who is in the call (after `before`)."""
        window = self.calls.window
        if window is None or not window.peers:
            return
        names = [printable(peer) + (" (through the host)"
                                    if self._paths.get(peer) == "relay" else "")
                 for peer in window.peers]
        who = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        trouble = f" {self.calls.trouble}" if self.calls.trouble else ""
        window.status(f"{before}In a call with {who}.{trouble}")

    def on_call_ended(self, event: dict) -> None:
        if self.chat is not None:
            self.chat.on_call_event(event)
        window = self.calls.window
        if window is None:
            return
        window.remove(event["peer"])
        self._paths.pop(event["peer"], None)
        if not window.peers:                # the last link ended: so did the call
            self.calls.close_all()
        else:
            self._say_who(before=CALL_LINES["call_ended"](event) + ". ")

    def on_media_state(self, event: dict) -> None:
        if self.calls.window is not None:
            self.calls.window.media_state(event["muted"], event["video"])
        elif self.chat is not None:
            self.chat.on_call_event(event)

    def on_media_stats(self, event: dict) -> None:
        """Said once per peer: its media comes through the host."""
        window = self.calls.window
        if window is not None and event["path"] == "relay" and \
                self._paths.get(event["peer"]) == "direct":
            self._paths[event["peer"]] = "relay"
            window.status(f"{printable(event['peer'])}'s video and sound go through the host, "
                          "not straight over UDP.")   # blocked, or --media-path relay

    def hang_up_picked(self) -> None:
        """ESC or Hang up: end the call with the peer whose tile is picked,
        or, with no tile picked, with the only peer. Never with your own
        tile picked: Backspace is that tile's key (it ends every call)."""
        window = self.calls.window
        if window is None:
            return
        if window.own_tile_picked():
            window.status("That is your own tile: Backspace or End all calls ends every call.")
            return
        peer = window.picked_peer() or (window.peers[0] if len(window.peers) == 1
                                        and window.selected is None else None)
        if peer is None:
            window.status("Click the tile of the person to hang up on first.")
            return
        self._quietly("hangup", self.core.hang_up(peer))

    def end_calls(self, only_if_own_tile: bool = False) -> None:
        """End all calls (Backspace on your own tile, End all, or closing
        the call window, which goes at once)."""
        window = self.calls.window
        if window is None or (only_if_own_tile and not window.own_tile_picked()):
            return
        self._quietly("hangup", self.core.hang_up(None))
        if not only_if_own_tile:
            self.calls.close_all()

    def _frame_of(self, name: str, mine: bool) -> tuple[int, Any]:
        """The newest frame of a tile: our camera's, or a peer's."""
        media = self.core.calls.media
        return (media.preview_serial, media.preview) if mine else media.latest_frame(name)

    def on_leave(self, chat: ChatWindow, values: dict) -> None:
        if self.phase is Phase.CHATTING:
            self._quietly("leave", self.core.leave(wait_for_uploads=False))
            chat.note("Leaving...")         # `closed` (quit) brings the launcher back
        elif self.phase is Phase.ENDED:
            self.back_to_launcher()

    def back_to_launcher(self) -> None:
        room = self.chat.room if self.chat else ""
        self._set_phase(Phase.CHOOSING)     # closes the chat window
        self.launcher.window.un_hide()
        self.launcher.status(f"You left {room}." + (
            f" Your host still runs on port {self.hosted_port}." if self.hosted_port else ""))
        self.launcher.trace_layout()

    def on_open(self, path: str) -> None:
        """Open a received file, or its folder, with the system's opener."""
        try:
            open_with_os(path)
        except OSError as exc:
            if self.chat is not None:
                self.chat.note(f"Can't open {printable(path)}: {exc.strerror or exc}", "error")

    def on_failed(self, message: str) -> None:
        """A command crashed in the core (a bug): say so rather than hang."""
        log.error("core command failed: %s", message)
        if self.chat is not None:
            self.chat.note(f"Something went wrong: {printable(message)}", "error")
        else:
            self.launcher.error(f"Something went wrong: {printable(message)}")

    # --- leaving from anywhere ---

    def windows(self) -> list[Any]:
        return ([self.launcher.window] + ([self.chat.window] if self.chat else [])
                + self.calls.windows + ([self.confirm.window] if self.confirm else []))

    def quit(self, confirmed: bool = False) -> None:
        """A window's close button: every window goes at once, the core stops
        in its own thread (leaving the room, withdrawing our host's mDNS
        record), and the loop ends when it is done, or after `gui_stop_wait_s`.
        While a file is moving, or others are in rooms we host, ask first."""
        if self.phase in (Phase.STOPPING, Phase.STOPPED):
            return
        worry = self._closing_worry()
        if worry and not confirmed:
            if self.confirm is None:
                self.confirm = ConfirmWindow(self.look, self.images, self.trace, worry)
            return
        self._drop_confirm()
        self._set_phase(Phase.STOPPING)
        for window in self.windows():
            window.hide()
        self.stop_deadline = time.monotonic() + self.limits.gui_stop_wait_s

        def stop_core() -> None:            # blocks for a moment: never on the loop
            self.core.stop()
            self.bridge.post((CORE_EVENT, "stopped"))

        threading.Thread(target=stop_core, name="chatroom-stop", daemon=True).start()

    def _closing_worry(self) -> str:
        """What closing now would break, in a sentence ("" = nothing)."""
        others = self.core.hosting_others
        if others:
            return (f"You host this room: closing ends it for {others} "
                    f"{'person' if others == 1 else 'people'} still in it.")
        if self.core.files.busy:
            return "A file is still on its way: closing stops it."
        return ""

    def _drop_confirm(self) -> None:
        if self.confirm is not None:
            self.confirm.close()
            self.confirm = None

    def finish(self) -> None:
        if self.phase is Phase.STOPPING and self.confirm is not None:
            self._drop_confirm()
        if self.phase is Phase.STOPPED:
            return
        self.bridge.detach()
        self.calls.close_all()
        if self.chat is not None:
            self.chat.close()
            self.chat = None
        self.launcher.window.close()
        self._set_phase(Phase.STOPPED)


_STOPPING_POLL_MS = 100             # while the core stops, the loop looks this often
_RINGING_POLL_MS = 1000             # a ringing call's countdown moves this often
_SWALLOWED_MAX = 8                  # events dispatched after one handler, at most
_UNCONFIRMED_S = 5.0                # a line the host hasn't confirmed after this is marked
_LOOP_STATS_EVERY = 500             # reads per `loop` trace record


def hide_own_console() -> None:  # pragma: no cover (Windows only)
    """Hide the console window Windows opened for a double-clicked executable.

    The executable is a console program, so --cli and --json work from a
    terminal; double-clicked, it would show an empty console behind the
    window. When no other process shares the console (a terminal would),
    it was made for us, and we hide it.
    """
    if sys.platform != "win32":             # (type checkers skip the rest elsewhere)
        return
    import ctypes
    kernel32 = ctypes.windll.kernel32
    ours = 2 if getattr(sys, "frozen", False) else 1   # + PyInstaller's bootloader
    attached = (ctypes.c_uint * 4)()
    if kernel32.GetConsoleProcessList(attached, 4) <= ours:
        console = kernel32.GetConsoleWindow()
        if console:
            ctypes.windll.user32.ShowWindow(console, 0)     # SW_HIDE


def run_gui(args: argparse.Namespace, limits: Limits, media: MediaOptions) -> int:
    """The desktop window (no mode flag). Returns the exit status."""
    try:
        import PySimpleGUI as sg  # here: only the window needs it
    except ImportError:
        raise MissingPackage("PySimpleGUI", "The desktop window") from None
    log.debug("PySimpleGUI %s", sg.version)
    import tkinter
    try:
        look = measure_screen(args.scale)
    except tkinter.TclError as exc:
        print(f"chatroom: can't open a window ({exc}); use --cli in a terminal, "
              "or --host to run a host.", file=sys.stderr)
        return EXIT_REFUSED
    use_palette(resolve_theme(args.theme, load_settings(settings_path()).get("theme")))
    apply_theme(look)
    log.info("font: %s, tk scaling %.2f", look.family, look.scaling)
    hide_own_console()
    trace = GuiTrace(os.environ.get(GUI_TRACE_ENV) == "1")
    if trace.enabled and hasattr(signal, "SIGUSR1"):   # tests: where is it stuck?
        import faulthandler
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    app = GuiApp(args, limits, media, look, settings_path(), trace)
    return app.run()


# =============================================================================
# 32. MAIN: argparse and the entry points
# =============================================================================
# Builds every object from the flags and passes them down; nothing above
# reads a global that main() sets. `python chatroom.py` with no mode opens
# the window; --host, --cli and --discover are the other modes.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatroom", description="A LAN chat room: host a room, find hosts, chat.",
        epilog="With no mode, the desktop window opens.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--host", action="store_true", help="run a room host")
    mode.add_argument("--cli", action="store_true", help="chat in this terminal")
    mode.add_argument("--discover", action="store_true", help="list hosts on the LAN")
    mode.add_argument("--list-devices", action="store_true",
                      help="list the cameras and audio devices found, then exit")
    mode.add_argument("--notices", action="store_true",
                      help="print the licences of chatroom and of what it bundles")
    parser.add_argument("--version", action="version",
                        version=f"chatroom {__version__} (protocol {PROTOCOL_VERSION})")
    parser.add_argument("--json", action="store_true",
                        help="one JSON event per stdout line (for scripts)")
    parser.add_argument("--room", help="Room ID to join (--cli)")
    parser.add_argument("--user", help="your User ID in the room (--cli)")
    parser.add_argument("--server", metavar="HOST[:PORT]",
                        help="join this host instead of discovering one (--cli)")
    parser.add_argument("--password", metavar="P", help="the room's password (--cli, the "
                        "window): a protected room needs it, and a room you open with it "
                        "is protected. The CHATROOM_PASSWORD environment variable does "
                        "the same without showing it to `ps`")
    parser.add_argument("--password-delay", type=float, default=PASSWORD_DELAY_S,
                        metavar="S", help="--host: after a wrong room password, the next "
                        "try from that address is heard S seconds later, doubled for each "
                        f"wrong one in a row up to {PASSWORD_DELAY_MAX_S / PASSWORD_DELAY_S:g}"
                        f" times S (default {PASSWORD_DELAY_S:g})")
    parser.add_argument("--name", help="the host's advertised name (--host); with "
                        "--cli or --discover, only hosts of this name")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"host's TCP port (default {DEFAULT_PORT}; 0 = any free)")
    parser.add_argument("--interface", metavar="ADDR",
                        help="listen and use mDNS on this address only (default: the LAN)")
    parser.add_argument("--no-advertise", action="store_true",
                        help="host without announcing itself on mDNS")
    parser.add_argument("--settle", type=float, default=DISCOVERY_SETTLE_S, metavar="S",
                        help="--cli: stop looking for hosts once none has appeared for S "
                        f"seconds (default {DISCOVERY_SETTLE_S:g}; up to --timeout)")
    parser.add_argument("--host-check", type=float, default=HOST_CHECK_S, metavar="S",
                        help="the window: dial each listed host every S seconds; one that "
                        f"doesn't answer {HOST_CHECK_MISSES} times in a row shows as not "
                        f"answering (default {HOST_CHECK_S:g})")
    parser.add_argument("--timeout", type=float, default=DISCOVERY_TIMEOUT_S,
                        help=f"seconds to look for hosts (default {DISCOVERY_TIMEOUT_S:g})")
    parser.add_argument("--retry-for", type=float, default=None, metavar="S",
                        help="after the connection drops, try to get back for S seconds "
                        f"(default {RETRY_FOR_S:g} in the terminal, for ever in the window; "
                        "0: don't)")
    parser.add_argument("--grace", type=float, default=GRACE_S, metavar="S",
                        help="--host: hold a dropped member's seat S seconds for its "
                        f"client to come back (default {GRACE_S:g}; 0: don't)")
    parser.add_argument("--history", type=int, default=HISTORY_LIMIT, metavar="N",
                        help=f"messages a late joiner gets (default {HISTORY_LIMIT})")
    parser.add_argument("--max-message-bytes", type=int, default=MAX_MESSAGE_BYTES,
                        metavar="N", help=f"longest chat text (default {MAX_MESSAGE_BYTES})")
    parser.add_argument("--login-timeout", type=float, default=HELLO_TIMEOUT_S,
                        metavar="S", help=f"seconds a login may take (default "
                        f"{HELLO_TIMEOUT_S:g})")
    parser.add_argument("--outbox-limit", type=int, default=OUTBOX_LIMIT_BYTES,
                        metavar="BYTES", help="bytes queued for one peer before it is "
                        f"disconnected as too slow (default {OUTBOX_LIMIT_BYTES})")
    parser.add_argument("--max-sessions", type=int, default=MAX_SESSIONS, metavar="N",
                        help=f"connections a host holds at once (default {MAX_SESSIONS})")
    parser.add_argument("--max-per-address", type=int, default=MAX_PER_ADDRESS, metavar="N",
                        help="--host: connections at once from one address (default "
                        f"{MAX_PER_ADDRESS}; 0: no limit)")
    parser.add_argument("--max-pending", type=int, default=MAX_PENDING, metavar="N",
                        help=f"--host: logins under way at once (default {MAX_PENDING}; "
                        "0: no limit)")
    parser.add_argument("--max-pending-per-address", type=int, metavar="N",
                        default=MAX_PENDING_PER_ADDRESS, help="--host: logins under way "
                        f"at once from one address (default {MAX_PENDING_PER_ADDRESS}; "
                        "0: no limit)")
    parser.add_argument("--rate-limit", type=float, default=RATE_LIMIT_PER_S,
                        metavar="MSGS_PER_S", help="--host: chat lines one member may send "
                        f"per second, sustained (default {RATE_LIMIT_PER_S:g}; 0: no limit)")
    parser.add_argument("--burst", type=int, default=BURST, metavar="N",
                        help=f"--host: chat lines one member may send at once (default "
                        f"{BURST}; 0: no limit)")
    parser.add_argument("--max-room-members", type=int, default=MAX_ROOM_MEMBERS,
                        metavar="N", help=f"people one room holds, 2 to "
                        f"{MAX_ROOM_MEMBERS_CAP} (default {MAX_ROOM_MEMBERS})")
    parser.add_argument("--ask-above", type=parse_size, default=None, metavar="SIZE",
                        help="--cli: a file larger than SIZE (e.g. 100M) waits for "
                        "/accept or /decline (default: never ask)")
    parser.add_argument("--downloads", metavar="DIR", help="where received files go "
                        "(default: a chatroom folder in your downloads folder)")
    parser.add_argument("--state-dir", metavar="DIR", type=Path,
                        help="where a client keeps what it needs to get back to its room "
                        "after a crash, and a host its TLS key (default: the config "
                        "folder, e.g. ~/.config/chatroom)")
    security = parser.add_argument_group("encryption")
    security.add_argument("--insecure", action="store_true",
                          help="plain TCP, no TLS: anyone on the network can read "
                          "everything (both sides must say it)")
    security.add_argument("--known-hosts", metavar="FILE", type=Path,
                          help="the hosts' keys this client has pinned (default: "
                          f"{KNOWN_HOSTS_FILE} in the config folder)")
    security.add_argument("--accept-new-key", action="store_true",
                          help="accept a host whose key changed (compare the new key "
                          "with the one the host shows first)")
    parser.add_argument("--max-file-size", type=parse_size, default=MAX_FILE_SIZE,
                        metavar="SIZE", help="largest file a host relays, e.g. 200M, 4G "
                        "(default 4G)")
    parser.add_argument("--spool-dir", metavar="DIR", help="where a host keeps files "
                        "while it relays them (default: the system's temp folder)")
    calls = parser.add_argument_group("calls")
    calls.add_argument("--camera", default="0", metavar="SOURCE",
                       help='a camera number (default 0), a video file (looped), "test" '
                       '(a moving test pattern) or "none"')
    calls.add_argument("--audio", default="default", metavar="DEVICE",
                       help='"default", a device number (see --list-devices), "tone" '
                       '(a 440 Hz sine), "null" (no device: silence) or FILE.wav (that '
                       'file as the microphone, looped; what calls play goes nowhere)')
    calls.add_argument("--no-echo-cancel", action="store_true",
                       help="send the microphone as it is: no echo cancelling, noise "
                       "suppression or automatic gain (with headphones, or when the "
                       "system cancels echo already)")
    calls.add_argument("--media-path", choices=("auto", "direct", "relay"), default="auto",
                       help="media over UDP, falling back to the host's relay when UDP "
                       "can't get through (auto, the default), UDP only, or relay only")
    calls.add_argument("--video-codec", choices=("auto", *VIDEO_CODECS), default="auto",
                       help="offer only this video codec (default: VP8, else JPEG)")
    calls.add_argument("--video-repair", choices=("both", "nack", "parity", "none"),
                       default="both", help="how lost video packets are made good: "
                       "parity and asking again (both, the default), asking again, "
                       "parity, or neither (to measure them)")
    calls.add_argument("--no-video-adapt", dest="video_adapt", action="store_false",
                       help="send video at the full rate whatever the peers report")
    calls.add_argument("--no-lip-sync", dest="lip_sync", action="store_false",
                       help="show each peer's video as soon as it is decoded, not with "
                       "the sound captured with it (to measure lip sync)")
    calls.add_argument("--media-port", type=int, default=0, metavar="PORT",
                       help="local UDP port for calls the host arranges (default: any)")
    calls.add_argument("--record", metavar="DIR", help="write what each call plays to DIR: "
                       "<peer>.wav and one frame a second as <peer>-<n>.png")
    calls.add_argument("--call-timeout", type=float, default=CALL_TIMEOUT_S, metavar="S",
                       help=f"seconds a call waits to be answered (default "
                       f"{CALL_TIMEOUT_S:g}); on --host for /CHECK, on --cli for direct calls")
    calls.add_argument("--max-call-size", type=int, default=MAX_CALL_SIZE, metavar="N",
                       help=f"people in one call, 2 or more (--host; default {MAX_CALL_SIZE})")
    parser.add_argument("--scale", type=parse_scale, default=1.0, metavar="FACTOR",
                        help="the window's size: text and spacing times FACTOR "
                        "(default 1.0; 1.5 = 150%%)")
    parser.add_argument("--theme", choices=THEMES, default=None,
                        help="the window's colours: light, dark, or system (as the desktop "
                        "is set). Default: the one last picked in the window, else system")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more to stderr")
    return parser


def parse_size(text: str) -> int:
    """"4096", "200K", "200M", "4G" (binary multiples) -> bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(match.group(1)) * 1024 ** " KMGT".index(match.group(2).upper() or " ")


def limits_from(args: argparse.Namespace) -> Limits:
    """The Limits the flags ask for; ValueError (a sentence) when one is out of range."""
    if args.history < 0 or args.max_message_bytes < 1 or args.outbox_limit < 1024:
        raise ValueError("--history, --max-message-bytes or --outbox-limit out of range")
    if not 2 <= args.max_room_members <= MAX_ROOM_MEMBERS_CAP:
        raise ValueError(f"--max-room-members takes 2 to {MAX_ROOM_MEMBERS_CAP}")
    if args.max_sessions < 1:
        raise ValueError("--max-sessions takes at least 1")
    if min(args.max_per_address, args.max_pending, args.max_pending_per_address,
           args.burst) < 0 or not args.rate_limit >= 0:
        raise ValueError("--max-per-address, --max-pending, --max-pending-per-address, "
                         "--rate-limit and --burst take 0 (no limit) or more")
    if not args.settle >= 0:
        raise ValueError("--settle takes a number of seconds")
    if not args.host_check > 0:
        raise ValueError("--host-check takes a number of seconds")
    if not 0 <= args.grace <= 86400:
        raise ValueError("--grace takes 0 to 86400 seconds")
    if args.retry_for is not None and not args.retry_for >= 0:
        raise ValueError("--retry-for takes a number of seconds")
    if not args.call_timeout > 0 or args.max_call_size < 2:
        raise ValueError("--call-timeout must be positive and --max-call-size at least 2")
    if not 0 <= args.media_port < 65536:
        raise ValueError("--media-port takes 0 to 65535")
    if not 0 < args.password_delay <= 3600:
        raise ValueError("--password-delay takes more than 0, and at most 3600, seconds")
    if len(room_password(args)) > MAX_PASSWORD_CHARS:
        raise ValueError(f"a room password has at most {MAX_PASSWORD_CHARS} characters")
    return Limits(history_limit=args.history, max_message_bytes=args.max_message_bytes,
                  hello_timeout_s=args.login_timeout, outbox_limit_bytes=args.outbox_limit,
                  max_sessions=args.max_sessions, max_room_members=args.max_room_members,
                  max_per_address=args.max_per_address, max_pending=args.max_pending,
                  max_pending_per_address=args.max_pending_per_address,
                  rate_limit_per_s=args.rate_limit, burst=args.burst,
                  max_file_size=args.max_file_size, call_timeout_s=args.call_timeout,
                  discovery_settle_s=args.settle, host_check_s=args.host_check,
                  grace_s=args.grace, retry_for_s=RETRY_FOR_S if args.retry_for is None
                  else args.retry_for,
                  max_call_size=args.max_call_size,
                  password_delay_s=args.password_delay,
                  password_delay_max_s=args.password_delay
                  * PASSWORD_DELAY_MAX_S / PASSWORD_DELAY_S,
                  # A frame must hold the longest text, JSON-escaped, and its envelope.
                  max_frame_bytes=max(MAX_FRAME_BYTES, _JSON_ESCAPE_FACTOR
                                      * args.max_message_bytes + _FRAME_ENVELOPE_BYTES))


_JSON_ESCAPE_FACTOR = 4             # "\u0001" is 6 bytes for 1, but text has few
_FRAME_ENVELOPE_BYTES = 4096        # a message's other fields


def media_options(args: argparse.Namespace) -> MediaOptions:
    """How this client takes part in calls, from the flags."""
    return MediaOptions(camera=args.camera, audio=args.audio, media_path=args.media_path,
                        record=args.record, media_port=args.media_port,
                        interface=args.interface, video_codec=args.video_codec,
                        video_repair=args.video_repair, video_adapt=args.video_adapt,
                        lip_sync=args.lip_sync, echo_cancel=not args.no_echo_cancel)


def run_list_devices(args: argparse.Namespace) -> int:
    """--list-devices: the cameras and audio devices this machine has."""
    found = list_devices()
    if args.json:
        print(json.dumps({"type": "devices", **found}, ensure_ascii=False))
        return EXIT_OK
    cameras = ", ".join(str(c) for c in found["cameras"]) or "none"
    print(f"Cameras (--camera N): {cameras}")
    for kind, label in (("audio_inputs", "Microphones"), ("audio_outputs", "Speakers")):
        print(f"{label} (--audio N):" + ("" if found[kind] else " none"))
        for device in found[kind]:
            print(f"  {device['index']}: {printable(device['name'])}")
    print(f"Codecs: video {', '.join(found['video_codecs']) or 'none'}; "
          f"audio {', '.join(found['audio_codecs']) or 'none'}")
    echo = found["echo_cancel"]
    print("Echo cancelling: " + ("works (livekit)" if echo["works"] else
                                 f"no ({echo['why']}); with speakers, use headphones"))
    return EXIT_OK


def run_notices() -> int:
    """--notices: chatroom's licence, and the third-party notices shipped
    beside it (inside the executable, in its assets)."""
    assets = Path(getattr(sys, "_MEIPASS", Path(__file__).resolve().parent)) / "assets"
    print(f"chatroom {__version__}: GNU General Public License, version 3 or later.\n")
    try:
        text = (assets / "THIRD-PARTY-NOTICES.txt").read_text(encoding="utf-8")
    except OSError as exc:
        print(f"chatroom: the third-party notices are missing ({exc.strerror})",
              file=sys.stderr)
        return EXIT_REFUSED
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:                 # `chatroom --notices | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


def run_host(args: argparse.Namespace, limits: Limits) -> int:
    """--host: serve rooms until Ctrl-C or SIGTERM. Returns the exit status."""
    printer = Printer(args.json)
    bind = args.interface or "0.0.0.0"
    key = None
    if not args.insecure:
        folder = args.state_dir or config_dir()
        try:
            key = HostKey.load_or_create(folder, args.name or socket.gethostname())
        except (OSError, ValueError) as exc:
            printer({"type": "error", "code": "file_io", "message":
                     f"can't keep the host's TLS key in {folder}: {_why(exc)}"})
            return EXIT_REFUSED

    async def serve() -> None:
        host = Host(bind=bind, port=args.port, name=args.name,
                    advertise=not args.no_advertise, interface=args.interface,
                    limits=limits, spool_dir=args.spool_dir, tls=key)
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:                            # also when a shell started us with
                asyncio.get_running_loop().add_signal_handler(signum, stop.set)
            except (NotImplementedError, RuntimeError):  # SIGINT ignored
                pass                        # Windows: Ctrl-C raises KeyboardInterrupt
        await host.start()
        try:
            printer({"type": "listening", "address": bind, "port": host.port,
                     "name": host.name, "advertised": host.advertiser is not None,
                     "fingerprint": host.fingerprint, "encrypted": key is not None})
            if key is None:                 # each time; after `listening`, which scripts await
                insecure_warning(printer, "--insecure: this host speaks plain TCP. Anyone "
                                 "on the network can read the chat, the files and their names")
            await stop.wait()
        finally:
            await host.close()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        code, message = listen_error(exc, args.port)
        printer({"type": "error", "code": code, "message": f"{message} (address {bind})"})
        return EXIT_REFUSED
    except MissingPackage as exc:
        printer({"type": "error", "code": exc.code, "message": exc.message})
        return EXIT_REFUSED
    printer({"type": "closed", "reason": "host_shutdown"})
    return EXIT_OK


class PrintableFormatter(logging.Formatter):
    """Log lines made printable (`printable`) before they reach a terminal:
    a warning may quote what a host or a peer sent."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return printable_block(self.inner.format(record))


def insecure_warning(printer: Printer, message: str) -> None:
    """--insecure, said every time: on stderr, and as a `warning` event."""
    print(f"chatroom: WARNING: {message}", file=sys.stderr, flush=True)
    printer({"type": "warning", "code": "insecure", "message": message})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for stream in (sys.stdout, sys.stderr, sys.stdin):
        if hasattr(stream, "reconfigure"):  # JSON and Chinese on any console,
            stream.reconfigure(encoding="utf-8", errors="replace")  # bad bytes too
    logging.basicConfig(level=logging.DEBUG if args.verbose else
                        logging.WARNING if args.json or args.cli else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:    # log lines quote the network too
        handler.setFormatter(PrintableFormatter(handler.formatter))
    try:
        limits = limits_from(args)
        if args.cli and not (args.room and args.user):
            parser.error("--cli needs --room and --user")
        if args.server:
            parse_server(args.server)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        if args.host:
            return run_host(args, limits)
        if args.cli:
            return run_terminal(args, limits, media_options(args))
        if args.discover:
            return run_discover(args)
        if args.list_devices:
            return run_list_devices(args)
        if args.notices:
            return run_notices()
        if args.retry_for is None:          # the window never gives up by itself
            limits = dataclasses.replace(limits, retry_for_s=math.inf)
        return run_gui(args, limits, media_options(args))
    except MissingPackage as exc:
        Printer(args.json)({"type": "error", "code": exc.code, "message": exc.message})
        return EXIT_REFUSED


if __name__ == "__main__":
    if sys.version_info < MIN_PYTHON:       # say so, rather than fail somewhere odd
        sys.exit(f"chatroom needs Python {'.'.join(map(str, MIN_PYTHON))} or newer; this is "
                 f"{sys.version.split()[0]} (Debian 12 and Ubuntu 24.04 have it; see README.md)")
    sys.exit(main())
