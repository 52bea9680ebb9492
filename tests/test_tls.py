"""Encryption and a host you can verify (issue 14), end to end.

A sniffer on `lo` (a raw AF_PACKET socket: these tests run as root, and
are skipped otherwise) records every TCP segment and UDP datagram while
hosts and terminal clients (`--cli --json`) chat, send a file and call
each other, then looks for what must not be there: the chat line, the
file's bytes and name, the JSON of any frame, a relayed media packet's
frame, the call's key. The same capture with `--insecure` on both sides
finds them, so the sniffer is known to see what it is meant to see.

Keys: a host keeps its key in --state-dir; each test's clients pin keys
in their own --known-hosts file. Every wait is for an event; nothing
here is timed.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import secrets
import socket
import stat
import struct
import threading
from pathlib import Path

import pytest

import chatroom
from conftest import LOOPBACK, ChatProcess

ROOM = "vault"
MEDIA = ("--camera", "test", "--audio", "tone", "--video-codec", "jpeg")
CALL_DEADLINE = 45.0                # a failure deadline only

# A relayed media packet's frame, as it would look in clear: a length that
# fits a packet, the binary tag 0x01, then a sealed packet's magic and kind.
MEDIA_FRAME = re.compile(rb"\x00\x00[\x00-\x05].\x01\xc1[\x01-\x03]", re.DOTALL)


# --- the sniffer ---------------------------------------------------------------

class Sniffer:
    """Everything that crosses `lo` while it runs: TCP payload bytes per
    (source port, destination port), in order, and UDP payloads."""

    def __init__(self) -> None:
        if not hasattr(socket, "AF_PACKET"):
            pytest.skip("needs Linux packet sockets")
        try:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))
        except PermissionError:
            pytest.skip("the sniffer needs root (a raw socket on lo)")
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.2)
        self.tcp: dict[tuple[int, int], bytearray] = {}
        self.udp: list[tuple[int, int, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sniffer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, address = self.sock.recvfrom(1 << 18)
            except TimeoutError:
                continue
            if address[2] == socket.PACKET_OUTGOING:   # lo shows each packet twice
                continue
            self._parse(data)
        self.sock.close()

    def _parse(self, data: bytes) -> None:
        if data[12:14] != b"\x08\x00":                # IPv4 only: the tests use 127.0.0.1
            return
        ip = data[14:]
        header = (ip[0] & 0x0F) * 4
        ip = ip[:struct.unpack(">H", ip[2:4])[0]]
        proto, body = ip[9], ip[header:]
        if len(body) < 8:
            return
        source, destination = struct.unpack(">HH", body[:4])
        if proto == 6:
            payload = body[(body[12] >> 4) * 4:]
            if payload:
                self.tcp.setdefault((source, destination), bytearray()).extend(payload)
        elif proto == 17:
            self.udp.append((source, destination, bytes(body[8:])))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def tcp_with(self, port: int) -> list[bytes]:
        """Each direction of every connection to or from `port`."""
        return [bytes(data) for (a, b), data in self.tcp.items() if port in (a, b)]

    def media_datagrams(self) -> list[bytes]:
        return [payload for a, b, payload in self.udp
                if payload[:1] == bytes([chatroom.MEDIA_MAGIC]) and 5353 not in (a, b)]


@pytest.fixture
def sniffer():
    made: list[Sniffer] = []

    def start() -> Sniffer:
        made.append(Sniffer())
        return made[-1]
    yield start
    for sniff in made:
        sniff.stop()


# --- helpers ---------------------------------------------------------------------

def member(join, port: int, user: str, tmp_path: Path, *flags: str, **kw):
    """A client in ROOM with its own downloads folder and known-hosts file."""
    client = join(port, ROOM, user, "--downloads", str(tmp_path / f"dl-{user}"),
                  "--known-hosts", str(tmp_path / "known-hosts.json"), *flags, **kw)
    client.downloads = tmp_path / f"dl-{user}"
    return client


def call(alice, bob) -> None:
    """alice /CHECKs bob, bob calls back; both connected."""
    alice.send(f"/CHECK {bob.user}")
    bob.wait_for("call_invite", CALL_DEADLINE)
    bob.send(f"/CHECK {alice.user}")
    for one, other in ((alice, bob), (bob, alice)):
        one.wait_for(lambda e, o=other: e.get("type") == "call_connected"
                     and e["peer"] == o.user, CALL_DEADLINE)


def video_arrives(client, peer: str, path: str) -> dict:
    return client.wait_for(lambda e: e.get("type") == "media_stats" and e["peer"] == peer
                           and e["video_fps"] > 0 and e["path"] == path, CALL_DEADLINE)


def chat_file_and_call(join, host, tmp_path: Path, media_path: str, *flags: str) -> dict:
    """alice and bob chat, alice sends bob a file, they call (video seen on
    `media_path`): what a sniffer must not see, and the clients."""
    alice = member(join, host.port, "alice", tmp_path, "--media-path", media_path,
                   *MEDIA, *flags)
    bob = member(join, host.port, "bob", tmp_path, "--media-path", media_path,
                 *MEDIA, *flags)
    line = f"the vault code is {secrets.token_hex(12)}"
    alice.send(line)
    assert bob.wait_for("message")["text"] == line
    content = os.urandom(200 * 1024)
    name = f"plans-{secrets.token_hex(8)}.bin"
    source = tmp_path / "src" / name
    source.parent.mkdir()
    source.write_bytes(content)
    alice.send(f"/send {source} @bob")
    got = bob.wait_for("file_received")
    assert Path(got["path"]).read_bytes() == content
    call(alice, bob)
    video_arrives(bob, "alice", media_path)
    video_arrives(alice, "bob", media_path)
    return {"line": line.encode(), "name": name.encode(), "content": content,
            "alice": alice, "bob": bob}


def leaks(streams: list[bytes], secret: dict) -> list[str]:
    """What of `secret` appears in clear in `streams`."""
    found = []
    content = secret["content"]
    probes = {"the chat line": [secret["line"]], "the file's name": [secret["name"]],
              "the file's content": [content[i:i + 32] for i in range(0, len(content), 4096)],
              "a JSON frame": [b'"type"'], "a call's start": [b"call_start"]}
    for what, needles in probes.items():
        if any(needle in stream for stream in streams for needle in needles):
            found.append(what)
    if any(MEDIA_FRAME.search(stream) for stream in streams):
        found.append("a relayed media frame")
    return found


# --- what a sniffer sees ---------------------------------------------------------

def test_a_sniffer_on_lo_sees_nothing_of_chat_files_or_relayed_calls(
        start_host, join, sniffer, tmp_path):
    host = start_host("--state-dir", str(tmp_path / "host"))
    assert host.listening["encrypted"] is True
    assert re.fullmatch(r"[0-9A-F]{64}", host.listening["fingerprint"])
    sniff = sniffer()
    secret = chat_file_and_call(join, host, tmp_path, "relay")
    assert secret["alice"].ready["fingerprint"] == host.listening["fingerprint"]
    assert secret["alice"].ready["encrypted"] is True
    sniff.stop()
    streams = sniff.tcp_with(host.port)
    assert sum(map(len, streams)) > len(secret["content"]), "the sniffer saw too little"
    assert leaks(streams, secret) == []


def test_direct_call_media_over_udp_is_sealed_and_its_key_never_crosses_in_clear(
        start_host, join, sniffer, tmp_path):
    host = start_host("--state-dir", str(tmp_path / "host"))
    sniff = sniffer()
    secret = chat_file_and_call(join, host, tmp_path, "direct")
    sniff.stop()
    assert leaks(sniff.tcp_with(host.port), secret) == []
    datagrams = sniff.media_datagrams()
    assert datagrams, "no media crossed UDP"
    for datagram in datagrams:
        # Each is a key-agreement hello (direct calls only) or a sealed packet.
        header = chatroom.peek_header(datagram)
        assert header is not None or datagram[1] == chatroom.KIND_HELLO, datagram[:16]
        assert b"JFIF" not in datagram         # what every JPEG frame says in clear


def test_the_same_sniffer_reads_everything_when_both_sides_say_insecure(
        start_host, join, sniffer, tmp_path):
    """The control: with --insecure on both sides the same capture finds
    the chat, the file, the call's key and the relayed media frames. Both
    sides warn, on stderr and as an event, every time."""
    host = start_host("--insecure")
    assert host.listening["encrypted"] is False and host.listening["fingerprint"] == ""
    assert host.wait_for("warning")["code"] == "insecure"
    sniff = sniffer()
    secret = chat_file_and_call(join, host, tmp_path, "relay", "--insecure")
    sniff.stop()
    found = leaks(sniff.tcp_with(host.port), secret)
    assert found == ["the chat line", "the file's name", "the file's content",
                     "a JSON frame", "a call's start", "a relayed media frame"]
    for client in (secret["alice"], secret["bob"]):
        warning = client.wait_for("warning", since=0)
        assert warning["code"] == "insecure" and "plain TCP" in warning["message"]
        assert any("--insecure" in line for line in client.stderr_lines)
        assert client.ready["encrypted"] is False and client.ready["fingerprint"] == ""
    assert any("WARNING" in line and "--insecure" in line for line in host.stderr_lines)


# --- pins ------------------------------------------------------------------------

def test_a_changed_host_key_is_refused_and_accepted_only_on_purpose(
        start_host, join, tmp_path):
    first = start_host("--state-dir", str(tmp_path / "key-a"))
    alice = member(join, first.port, "alice", tmp_path)
    pinned = alice.wait_for("host_key", since=0)
    assert pinned["status"] == "new" and pinned["fingerprint"] == first.listening["fingerprint"]
    alice.send("/quit")
    assert alice.wait() == 0
    old_key = first.listening["fingerprint"]
    first.stop()

    # Another key on the same address and port: an impostor, or a reinstall.
    second = start_host("--state-dir", str(tmp_path / "key-b"), "--port", str(first.port))
    new_key = second.listening["fingerprint"]
    assert new_key != old_key
    refused = member(join, second.port, "alice", tmp_path, ready=False)
    error = refused.wait_for("error")
    assert error["code"] == "host_key_changed"
    assert (error["old_fingerprint"], error["fingerprint"]) == (old_key, new_key)
    assert chatroom.show_fingerprint(old_key) in error["message"]
    assert chatroom.show_fingerprint(new_key) in error["message"]
    assert "--accept-new-key" in error["message"]
    assert refused.wait_for("closed")["reason"] == "refused"
    assert refused.wait() == chatroom.EXIT_REFUSED
    # It said nothing to the impostor: no login reached the host's room.
    assert not [e for e in refused.seen() if e["type"] in ("ready", "system")]

    accepted = member(join, second.port, "alice", tmp_path, "--accept-new-key")
    note = accepted.wait_for("host_key", since=0)
    assert (note["status"], note["old_fingerprint"], note["fingerprint"]) == \
        ("accepted", old_key, new_key)
    assert accepted.ready["fingerprint"] == new_key
    accepted.send("/quit")
    assert accepted.wait() == 0
    again = member(join, second.port, "alice", tmp_path)     # pinned now: no question
    assert not [e for e in again.seen() if e["type"] == "host_key"]
    pins = json.loads((tmp_path / "known-hosts.json").read_text())["hosts"]
    assert set(pins.values()) == {new_key}
    assert stat.S_IMODE((tmp_path / "known-hosts.json").stat().st_mode) == 0o600


def test_getting_back_after_a_drop_checks_the_key_too(start_host, join, tmp_path):
    """A host that comes back with another key is refused, not resumed."""
    first = start_host("--state-dir", str(tmp_path / "key-a"))
    alice = member(join, first.port, "alice", tmp_path, "--retry-for", "60")
    first.stop(signum=9)
    alice.wait_for("reconnecting")
    second = start_host("--state-dir", str(tmp_path / "key-b"), "--port", str(first.port))
    error = alice.wait_for("error", CALL_DEADLINE)
    assert error["code"] == "host_key_changed"
    assert error["fingerprint"] == second.listening["fingerprint"]
    assert alice.wait_for("closed")["reason"] == "refused"
    assert not [e for e in alice.seen() if e["type"] == "resumed"]


def test_tls_and_insecure_do_not_mix_and_say_why(start_host, join, tmp_path):
    plain = start_host("--insecure")
    client = member(join, plain.port, "alice", tmp_path, ready=False)
    error = client.wait_for("error")
    assert error["code"] == "tls_mismatch" and "--insecure" in error["message"]
    assert client.wait_for("closed")["reason"] == "refused"
    assert client.wait() == chatroom.EXIT_REFUSED

    tls = start_host("--state-dir", str(tmp_path / "host"))
    client = member(join, tls.port, "bob", tmp_path, "--insecure", ready=False)
    assert client.wait_for("warning")["code"] == "insecure"
    error = client.wait_for("error")
    assert error["code"] == "tls_mismatch" and "--insecure" in error["message"]
    assert client.wait_for("closed")["reason"] == "refused"
    assert client.wait() == chatroom.EXIT_REFUSED


def test_the_advertised_fingerprint_is_the_one_the_client_pins(tmp_path):
    """mDNS on 127.0.0.1: --discover shows the host's fingerprint, and a
    client that finds the host by name pins that same key under its name."""
    name = f"tls-{secrets.token_hex(4)}"
    procs = []
    try:
        host = ChatProcess(["--host", "--json", "--port", "0", "--interface", LOOPBACK,
                            "--name", name, "--state-dir", str(tmp_path / "host")],
                           label="host")
        procs.append(host)
        listening = host.wait_for("listening")
        found = ChatProcess(["--discover", "--json", "--interface", LOOPBACK, "--name",
                             name, "--timeout", "8"], label="discover")
        procs.append(found)
        advertised = found.wait_for("host")
        assert advertised["fingerprint"] == listening["fingerprint"]
        client = ChatProcess(["--cli", "--json", "--interface", LOOPBACK, "--name", name,
                              "--room", ROOM, "--user", "alice", "--known-hosts",
                              str(tmp_path / "known.json")], label="client")
        procs.append(client)
        pinned = client.wait_for("host_key")
        # The name as IDs are compared (id_key: case and look-alikes folded,
        # "0" reads "o"), so a look-alike of a pinned name meets its pin.
        assert pinned["host"] == chatroom.name_label(name) and pinned["status"] == "new"
        assert pinned["fingerprint"] == advertised["fingerprint"]
        assert client.wait_for("ready")["fingerprint"] == advertised["fingerprint"]
    finally:
        for proc in procs:
            proc.cleanup()


# --- the pieces, without sockets -------------------------------------------------

def test_the_host_key_is_kept_owner_only_and_its_pin_survives_a_new_certificate(tmp_path):
    key = chatroom.HostKey.load_or_create(tmp_path, "here")
    assert stat.S_IMODE(key.key_path.stat().st_mode) == 0o600
    assert chatroom.HostKey.load_or_create(tmp_path).fingerprint == key.fingerprint

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID
    private = serialization.load_pem_private_key(key.key_path.read_bytes(), None)
    old = x509.load_pem_x509_certificate(key.cert_path.read_bytes())
    assert private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == \
        chatroom.certificate_spki(old.public_bytes(serialization.Encoding.DER))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "renewed")])
    now = datetime.datetime.now(datetime.UTC)
    renewed = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
               .public_key(private.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
               .sign(private, hashes.SHA256()))
    key.cert_path.write_bytes(renewed.public_bytes(serialization.Encoding.PEM))
    assert chatroom.HostKey.load_or_create(tmp_path).fingerprint == key.fingerprint


def test_fingerprints_are_shown_in_groups_and_junk_certificates_refused():
    digits = "3F2A9C01" * 8
    assert chatroom.show_fingerprint(digits) == "3F2A 9C01 " * 3 + "3F2A 9C01"
    assert len(chatroom.show_fingerprint(digits, full=True).split()) == 16
    for junk in (b"", b"\x30", b"\x30\x84\xff\xff\xff\xff", b"\x30\x03\x30\x01\x02",
                 bytes(64), os.urandom(300)):
        with pytest.raises(ValueError):
            chatroom.certificate_spki(junk)
    assert chatroom.txt_fingerprint({b"fp": digits.lower().encode()}) == digits
    assert chatroom.txt_fingerprint({b"fp": b"nope"}) == ""
    assert chatroom.txt_fingerprint({b"fp": None}) == ""


def test_known_hosts_pin_first_refuse_changes_and_accept_only_what_was_asked(tmp_path):
    known = chatroom.KnownHosts(tmp_path / "k.json")
    a, b, c = "A" * 64, "B" * 64, "C" * 64
    assert known.check("name:x", a) == ("new", "")
    assert known.check("name:x", a) == ("known", a)
    assert known.check("name:x", b) == ("changed", a)
    assert known.check("name:x", b, accept=c) == ("changed", a)    # not the key shown
    assert known.check("name:x", b, accept=b) == ("accepted", a)
    ok, events = known.verify(["name:x", "10.0.0.2:5000"], b)
    assert ok and [e["status"] for e in events] == ["new"]
    ok, events = known.verify(["name:x"], c)
    assert not ok and events[0]["code"] == "host_key_changed"
    known.save()
    assert chatroom.KnownHosts(tmp_path / "k.json").pins == known.pins
    (tmp_path / "k.json").write_text("{not json")
    assert chatroom.KnownHosts(tmp_path / "k.json").pins == {}


def test_private_files_written_from_many_threads_at_once_never_collide(tmp_path):
    """The window's leave-and-join saved the pins twice at once: both writers
    used one temporary name, and the second rename found nothing (a CI
    failure). Each write now has a temporary file of its own."""
    path = tmp_path / "known-hosts.json"
    payloads = [json.dumps({"writer": n}).encode() for n in range(16)]
    start, failures = threading.Barrier(len(payloads)), []

    def write(data: bytes) -> None:
        start.wait()
        for _ in range(20):
            try:
                chatroom.write_private(path, data)
            except OSError as exc:          # the bug: FileNotFoundError on rename
                failures.append(exc)
    threads = [threading.Thread(target=write, args=(data,)) for data in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert path.read_bytes() in payloads                    # one whole payload, not a mix
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["known-hosts.json"]   # no leftovers
