"""A rogue host on loopback (issue 14): escapes, bidi overrides and bad
names from a host never reach a client's terminal.

A raw socket stands in for the host (speaking TLS with a key of its own,
which the client, meeting it first, pins): it answers the hello with a welcome,
then sends messages, a notice and an error full of terminal escapes, events
from senders whose names are not valid IDs, and a closing whose reason
would clear the screen and set the window title. Real `--cli` clients
(human output, then --json) read it all.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import unicodedata

import pytest

import chatroom
from conftest import CHATROOM, LOOPBACK, Client, child_env, frame_json, read_frame

ESCAPES = "\x1b[2J\x1b]0;pwned\x07"
NASTY = f"hi {ESCAPES} \x9b31m C1 \u202eevil\u202c \u2066iso\u2069 \x7f end"
CLOSING = f"bye-{ESCAPES}"
BAD_SENDERS = [f"eve{ESCAPES}", "\u0430lice", "alice\u3164", "bob\nmallory: hi",
               "x\u202eevil", "SYSTEM", "a" * 33]    # ("" is a bad frame: tests/test_cli.py)
T0 = 1_700_000_000.0


def _frames(room: str, user: str) -> list[dict]:
    """What the rogue host says after the hello, in order."""
    seq = iter(range(1, 100))
    out: list[dict] = [{"type": "welcome", "version": chatroom.PROTOCOL_VERSION,
                        "room": room, "user": user, "members": [user, "mallory"],
                        "host": f"rogue{ESCAPES}"}]
    out.append({"type": "message", "seq": next(seq), "id": "m-1", "from": "mallory",
                "text": NASTY, "ts": T0})
    for n, sender in enumerate(BAD_SENDERS):
        out.append({"type": "message", "seq": next(seq), "id": f"b-{n}", "from": sender,
                    "text": f"forged-{n}", "ts": T0})
    out.append({"type": "system", "seq": next(seq), "event": "enter", "user": f"z{ESCAPES}",
                "text": f"forged-notice {ESCAPES}", "ts": T0})
    out.append({"type": "system", "seq": next(seq), "event": "enter", "user": "mallory",
                "text": f"[SYSTEM] {NASTY}", "ts": T0})
    out.append({"type": "error", "code": "bad_message", "message": NASTY})
    out.append({"type": "call_invite", "from": f"eve{ESCAPES}"})
    out.append({"type": "message", "seq": next(seq), "id": "m-last", "from": "mallory",
                "text": "last line", "ts": T0})
    out.append({"type": "closing", "reason": CLOSING})
    return out


class RogueHost:
    """One connection: read the hello, send `_frames`, keep reading until
    the client goes (so its frames never block it)."""

    def __init__(self, key: chatroom.HostKey) -> None:
        self.tls = key.server_context()
        self.server = socket.create_server((LOOPBACK, 0))
        self.port = self.server.getsockname()[1]
        self.hello: dict = {}
        self.thread = threading.Thread(target=self._serve, daemon=True, name="rogue host")
        self.thread.start()

    def _serve(self) -> None:
        with self.server:
            self.server.settimeout(60)
            plain, _ = self.server.accept()
            try:
                conn = self.tls.wrap_socket(plain, server_side=True)
            except OSError:                 # no TLS from the client: its test says so
                plain.close()
                return
            with conn:
                self.hello = read_frame(conn)
                try:
                    for obj in _frames(self.hello["room"], self.hello["user"]):
                        conn.sendall(frame_json(obj))
                        time.sleep(0.02)
                    conn.settimeout(30)
                    while conn.recv(65536):
                        pass
                except OSError:             # the client hung up early: its test says so
                    pass

    def close(self) -> None:
        self.server.close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def rogue_key(tmp_path_factory) -> chatroom.HostKey:
    return chatroom.HostKey.load_or_create(tmp_path_factory.mktemp("rogue-key"), "rogue")


@pytest.fixture
def rogue(rogue_key):
    host = RogueHost(rogue_key)
    yield host
    host.close()


@pytest.fixture
def client_for():
    started: list[Client] = []

    def start(port: int, json_mode: bool) -> Client:
        client = Client(port, "lobby", "carol", "--retry-for", "0", json_mode=json_mode)
        started.append(client)
        return client

    yield start
    for client in started:
        client.cleanup()


def raw_controls(text: str) -> list[str]:
    """Characters that act on a terminal or reorder a line (the newline
    ending a line is not in these lines)."""
    return [ch for ch in text if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")
            and ch != "\t"]


def test_a_rogue_host_cannot_write_escapes_to_the_terminal(rogue, client_for):
    carol = client_for(rogue.port, json_mode=False)
    assert carol.wait() == chatroom.EXIT_DISCONNECTED
    out, err = carol.seen(), carol.stderr_lines
    for line in out + err:
        assert not raw_controls(line), f"raw control in {line!r}"
    text = "\n".join(out)
    # What the host said is there, escaped where it would act on a terminal.
    assert any("mallory: hi \\u001b[2J\\u001b]0;pwned\\u0007" in line for line in out), text
    assert "\\u202eevil" in text and "last line" in text
    # A closing reason we don't know is the host breaking the protocol.
    assert chatroom.CLOSED_REASONS["protocol_error"] in text, text
    assert "pwned" not in text.split("last line")[-1], text      # not the closing's words
    # Events naming someone who can't be: dropped, each with a warning.
    assert "forged-" not in text, text
    assert "CALL YOU" not in text, text
    warnings = [line for line in err if "bad name" in line]
    assert len(warnings) >= len(BAD_SENDERS), err


def test_the_json_client_gets_the_same_protection_and_whole_texts(rogue, client_for):
    carol = client_for(rogue.port, json_mode=True)
    assert carol.wait() == chatroom.EXIT_DISCONNECTED
    events = carol.seen()
    assert not [e for e in events if e["type"] == "<not json>"], events
    ready = next(e for e in events if e["type"] == "ready")
    assert ready["host"] == f"rogue{ESCAPES}"               # JSON keeps text whole
    said = [e for e in events if e["type"] == "message"]
    assert [(e["from"], e["text"]) for e in said] == [("mallory", NASTY),
                                                        ("mallory", "last line")], said
    notices = [e for e in events if e["type"] == "system"]
    assert [e["user"] for e in notices] == ["mallory"], notices
    assert not [e for e in events if e["type"] == "call_invite"], events
    assert events[-1] == {"type": "closed", "reason": "protocol_error"}, events[-1]
    for line in carol.stderr_lines:
        assert not raw_controls(line), f"raw control in {line!r}"


def test_json_lines_have_no_raw_controls(rogue):
    """The bytes on stdout: one JSON object a line, nothing a terminal acts on."""
    done = subprocess.run(
        [sys.executable, str(CHATROOM), "--cli", "--json", "--retry-for", "0", "--server",
         f"{LOOPBACK}:{rogue.port}", "--room", "lobby", "--user", "carol"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=60, env=child_env())
    lines = done.stdout.decode("utf-8").split("\n")
    assert lines[-1] == "" and len(lines) > 5
    for line in lines[:-1]:
        assert not raw_controls(line), repr(line)
        assert "\u2028" not in line and "\x85" not in line
