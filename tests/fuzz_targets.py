"""Coverage-guided fuzz targets for what chatroom.py takes from the network.

Each target is a plain function of one bytes argument that returns quietly
for any input and raises only when it finds a bug: an exception that the
code under test does not document, or a broken promise checked below.

- `frames`: a byte stream into FrameDecoder and a Wire (WIRE PROTOCOL).
  Only RemoteError may come out; the stream split anywhere gives the same
  frames or the same error as in one piece; every event decoded re-encodes
  to itself.
- `events`: message validation: JSON objects of every event type, with
  fields of every shape, into Event.from_wire and decode_body (FIELD_RULES).
  Only RemoteError may come out; what is accepted re-encodes to itself.
- `media`: UDP packets and inner payloads (MEDIA PACKETS): peek_header,
  unpack_hello, KeyExchange.agree, Opener.open, unpack_video/audio/control
  and a Reassembler. Nothing may raise (agree: ValueError, as documented);
  what unpacks packs back to the same bytes; frames come out in order.

Run one with atheris (a libFuzzer front end), crashes saved as files:

    python tests/fuzz_targets.py frames -max_total_time=60 tests/fuzz-corpus/frames

tests/test_fuzz.py replays every file of tests/fuzz-corpus/<target>/ through
its target as a normal test, and runs each target for a few seconds.
`python tests/fuzz_targets.py --seed` writes the seed corpus (valid frames,
objects and packets made by chatroom's own encoders) into tests/fuzz-corpus/.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "fuzz-corpus"

if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] != "--seed":
    import atheris
    sys.path.insert(0, str(ROOT))
    # Instrument chatroom's bytecode for coverage as it is imported.
    with atheris.instrument_imports(include=["chatroom"]):
        import chatroom as c
else:
    sys.path.insert(0, str(ROOT))
    import chatroom as c

LINK_ID = b"\x01\x02\x03\x04"
LINK_KEY = bytes(range(32))
_, RECEIVE_KEY = c.direction_keys(LINK_KEY, True)   # we are side a; b seals with this key
OUR_PRIVATE = bytes(range(1, 33))
PEER_PRIVATE = bytes(range(2, 34))

HELLO = c.Hello(c.PROTOCOL_VERSION, "lobby", "alice", "chatroom/fuzz")
WELCOME = c.Welcome(c.PROTOCOL_VERSION, "lobby", "alice", ("bob", "alice"), "fuzzhost")
# The ordinary life of a connection; its first n steps bring a Wire to state n.
LIFE = [(c.Role.CLIENT, HELLO), (c.Role.HOST, WELCOME),
        (c.Role.CLIENT, c.Bye()), (c.Role.HOST, c.Closing("quit"))]
SMALL_FRAME_LIMIT = 200     # above the frames of LIFE


# --- frames ------------------------------------------------------------------------------

def _check_round_trip(event: Any) -> None:
    """An event that was accepted from the wire encodes, and decodes to itself."""
    if isinstance(event, c.Chunk | c.MediaData):
        return
    again = c.decode_body(bytes(c.encode(event)[4:]))
    assert again == event, f"{event!r} came back as {again!r}"


def _split_feed(decoder: Any, data: bytes, step: int) -> tuple[list[bytes], bool]:
    bodies: list[bytes] = []
    try:
        for i in range(0, len(data), step):
            bodies += [bytes(b) for b in decoder.feed(data[i:i + step])]
    except c.RemoteError:
        return bodies, True
    return bodies, False


def frames(data: bytes) -> None:
    """data[0]: bit 0 the Wire's role, bits 1-2 its state, bit 3 a small frame limit;
    data[1]: the size of the pieces the rest arrives in; then the stream."""
    if len(data) < 2:
        return
    role = c.Role.HOST if data[0] & 1 else c.Role.CLIENT
    limit = SMALL_FRAME_LIMIT if data[0] & 8 else c.MAX_FRAME_BYTES
    step = data[1] + 1
    stream = data[2:]

    # The decoder alone: in one piece and in pieces, the same frames or the same error.
    whole, whole_error = _split_feed(c.FrameDecoder(limit), stream, max(1, len(stream)))
    split, split_error = _split_feed(c.FrameDecoder(limit), stream, step)
    assert whole_error == split_error, "a split stream errs where the whole one doesn't"
    if not whole_error:
        assert whole == split, "a split stream gives other frames"
    for body in whole if whole_error else split:
        try:
            _check_round_trip(c.decode_body(body))
        except c.RemoteError:
            pass

    # A Wire in one of the states of a connection's life.
    wire = c.Wire(role, limit)
    for sender, event in LIFE[:data[0] >> 1 & 3]:
        if sender is role:
            wire.check_send(event)
        else:
            wire.receive(c.encode(event))
    try:
        for i in range(0, len(stream), step):
            for event in wire.receive(stream[i:i + step]):
                assert isinstance(event, c.Event)
        wire.receive(b"")
    except c.RemoteError:
        assert wire.state is c.State.CLOSED
    else:
        assert wire.state is c.State.CLOSED


# --- events ------------------------------------------------------------------------------

EVENT_NAMES = sorted(c.EVENT_TYPES)
FIELD_NAMES = sorted(c.WIRE_NAMES.get(name, name) for name in c.FIELD_RULES)
SPECIAL_NUMBERS = [0, 1, -1, 2 ** 31, 2 ** 53, 2 ** 53 + 1, 2 ** 64, 10 ** 400, 0.5, -0.0,
                   1e308, 65535, 65536, 2 ** 40]
SPECIAL_TEXT = ["", " ", "\u3164", "\u2800", "\u2028", "a\u2029b", "\ud800", "\ud83d\ude00",
                "\x00", "\x1b[2J", "SYSTEM", "аlice", "alice", "a" * 65, "ab" * 32, "9f" * 16,
                "vp8", "opus", "a", "b", "192.168.1.20"]


class _Bytes:
    """Reads values from fuzz input; past its end, zeros (so every input is valid)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def byte(self) -> int:
        self.at += 1
        return self.data[self.at - 1] if self.at <= len(self.data) else 0

    def take(self, n: int) -> bytes:
        out = self.data[self.at:self.at + n]
        self.at += n
        return out

    def value(self, depth: int = 0) -> Any:
        kind = self.byte() % 11
        if kind == 0:
            return None
        if kind == 1:
            return bool(self.byte() & 1)
        if kind == 2:
            return int.from_bytes(self.take(self.byte() % 9), "big", signed=True)
        if kind == 3:
            return SPECIAL_NUMBERS[self.byte() % len(SPECIAL_NUMBERS)]
        if kind == 4:
            raw = self.take(8).ljust(8, b"\0")
            return struct.unpack(">d", raw)[0]
        if kind == 5:
            return SPECIAL_TEXT[self.byte() % len(SPECIAL_TEXT)]
        if kind in (6, 7):
            size = self.byte()
            if kind == 7:
                size = size << 8 | self.byte()
            raw = self.take(size)
            try:    # an odd size may carry lone surrogates, as JSON's escapes can
                return raw.decode("utf-8", "surrogatepass" if size & 1 else "strict")
            except UnicodeDecodeError:
                return raw.decode("utf-8", "replace")
        if kind == 8 and depth < 4:
            return [self.value(depth + 1) for _ in range(self.byte() % 6)]
        if kind == 9 and depth < 4:
            return {FIELD_NAMES[self.byte() % len(FIELD_NAMES)]: self.value(depth + 1)
                    for _ in range(self.byte() % 4)}
        return EVENT_NAMES[self.byte() % len(EVENT_NAMES)]


def _event_object(data: bytes) -> dict:
    """data[0]: the event type; then, for each of its fields, present or not and a value;
    then extra fields (any name) while bytes last."""
    src = _Bytes(data)
    cls = c.EVENT_TYPES[EVENT_NAMES[src.byte() % len(EVENT_NAMES)]]
    obj: dict[str, Any] = {"type": cls.TYPE}
    for field in dataclasses.fields(cls):
        if src.byte() % 8:
            obj[c.WIRE_NAMES.get(field.name, field.name)] = src.value()
    for _ in range(src.byte() % 4):
        obj[FIELD_NAMES[src.byte() % len(FIELD_NAMES)]] = src.value()
    return obj


def events(data: bytes) -> None:
    obj = _event_object(data)
    try:
        event = c.Event.from_wire(obj)      # Python strings: lone surrogates and all
    except c.RemoteError:
        event = None
    if event is not None:
        _check_round_trip(event)
    try:
        text = json.dumps(obj, allow_nan=False)     # ASCII escapes: lone surrogates travel
    except ValueError:
        return      # NaN or inf: not JSON; decode_body refuses their spellings on its own
    # What the JSON says (escaped surrogate pairs become one character, as in JSON) is
    # what decode_body sees: both ways, the same verdict.
    parsed = json.loads(text)
    try:
        event = c.Event.from_wire(parsed)
    except c.RemoteError:
        event = None
    try:
        decoded = c.decode_body(text.encode("ascii"))
    except c.RemoteError:
        decoded = None
    assert decoded == event, f"{parsed!r}: from_wire gives {event!r}, its JSON {decoded!r}"


# --- media -------------------------------------------------------------------------------

def _records(data: bytes) -> list[bytes]:
    """data as records of a big-endian u16 length and that many bytes."""
    out, at = [], 0
    while at < len(data):
        size = int.from_bytes(data[at:at + 2], "big")
        out.append(data[at + 2:at + 2 + size])
        at += 2 + size
    return out


class _Receiver:
    """What a client does with the packets of one link, without sockets or clocks."""

    def __init__(self, hold_ms: float) -> None:
        self.opener = c.Opener(LINK_ID, RECEIVE_KEY)
        self.exchange = c.KeyExchange(OUR_PRIVATE)
        self.reassembler = c.Reassembler(hold_ms=hold_ms)
        self.gate = c.KeyframeGate()
        self.now_ms = 0.0
        self.newest = -1

    def packet(self, packet: bytes) -> None:
        header = c.peek_header(packet)
        if header is not None and header[0] == c.KIND_HELLO:
            hello = c.unpack_hello(packet)
            if hello is not None:
                public, info = hello
                assert len(public) == 32 and type(info) is dict
                try:
                    link = self.exchange.agree(public)
                except ValueError:
                    pass
                else:
                    assert len(link.link_id) == 4 and len(link.link_key) == 32
        opened = self.opener.open(packet)
        if opened is not None:
            kind, seq, inner = opened
            assert header == (kind, LINK_ID, seq)
            self.inner(kind, inner)

    def inner(self, kind: int, inner: bytes) -> None:
        self.now_ms += 7
        if kind == c.KIND_VIDEO:
            fragment = c.unpack_video(inner)
            if fragment is not None and len(inner) <= c.MAX_INNER_BYTES:
                assert c.pack_video(fragment) == bytes(inner)
            self.frames(self.reassembler.add(inner, self.now_ms))
            self.reassembler.lost(self.now_ms)
            self.frames(self.reassembler.poll(self.now_ms))
        elif kind == c.KIND_AUDIO:
            audio = c.unpack_audio(inner)
            if audio is not None and len(inner) <= c.MAX_INNER_BYTES:
                assert c.pack_audio(audio) == bytes(inner)
        elif kind == c.KIND_CONTROL:
            control = c.unpack_control(inner)
            if control is not None:
                assert c.pack_control(control) == bytes(inner)

    def frames(self, frames: list[Any]) -> None:
        for frame in frames:
            assert frame.frame_id > self.newest, "frames out of order or twice"
            self.newest = frame.frame_id
            self.gate.check(frame, self.now_ms)


def media(data: bytes) -> None:
    """data[0]: bit 0 the mode (0: UDP packets, opened as a client would; 1: inner
    payloads, each record's first byte its kind), bit 1 repair (hold_ms); then records."""
    if not data:
        return
    receiver = _Receiver(hold_ms=60 if data[0] & 2 else 0)
    for record in _records(data[1:]):
        if data[0] & 1 == 0:
            receiver.packet(record)
        elif record:
            receiver.inner(record[0] % 4, record[1:])
    receiver.now_ms += c.STALE_MS
    receiver.frames(receiver.reassembler.poll(receiver.now_ms))


TARGETS: dict[str, Callable[[bytes], None]] = {"frames": frames, "events": events,
                                               "media": media}


# --- the seed corpus ---------------------------------------------------------------------

def _record(payload: bytes) -> bytes:
    return len(payload).to_bytes(2, "big") + payload


def _value_bytes(value: Any) -> bytes:
    """Bytes that _Bytes.value reads back as `value` (the shapes the seeds need)."""
    if isinstance(value, bool):
        return bytes([1, value])
    if isinstance(value, int) and -2 ** 63 <= value < 2 ** 63:
        return bytes([2, 8]) + value.to_bytes(8, "big", signed=True)
    if isinstance(value, float):
        return bytes([4]) + struct.pack(">d", value)
    if isinstance(value, str):
        raw = value.encode("utf-8")
        return bytes([7, len(raw) >> 8, len(raw) & 0xFF]) + raw
    if isinstance(value, tuple | list):
        return bytes([8, len(value)]) + b"".join(_value_bytes(v) for v in value)
    return bytes([0])


def seeds() -> dict[str, list[bytes]]:
    """Valid inputs for each target, made by chatroom's own encoders."""
    life = [(role, c.encode(event)) for role, event in LIFE]
    chat = [c.Say("c1-1", "你好, world 👋"), c.Message(3, "c1-1", "张伟", "hi", 1.5e9, False),
            c.Members(("alice", "张伟")), c.Ping(7), c.Pong(2 ** 53), c.Who(),
            c.FileOffer(1, "报告.pdf", 123_456, "张伟"), c.FileEnd(1, "ab" * 32),
            c.CallStart("张伟", "192.168.1.20", 50000, "0a1b2c3d", "ef" * 32, "a", "vp8",
                        "opus"),
            c.Resumed("大厅", "张伟", ("alice",), "host", 0, 3, 0, ((1, 4096, False),),
                      ((3, "bob", "f.pdf", 9000, ""),))]
    from_client = b"".join(frame for role, frame in life if role is c.Role.CLIENT)
    from_host = b"".join(frame for role, frame in life if role is c.Role.HOST)
    body = b"".join(c.encode(e) for e in chat)
    data = c.chunk_header(1, 5) + b"hello" + c.encode(c.MediaData(b"\xc1\x04" + bytes(40)))
    frames_seeds = [
        bytes([1 | 0 << 1, 255]) + from_client,          # a host hearing a client's life
        bytes([0 | 0 << 1, 3]) + from_host,              # a client hearing the host's, by 4s
        bytes([1 | 2 << 1, 0]) + body + data,            # READY, byte by byte
        bytes([0 | 2 << 1, 16]) + body,
        bytes([8 | 1 | 2 << 1, 255]) + body,             # a small frame limit
        bytes([1, 255]) + struct.pack(">I", 2 ** 32 - 1) + b"{",
    ]

    event_seeds = []
    examples = [HELLO, WELCOME, c.Bye(), c.Closing("quit"), *chat,
                c.Error("rate_limited", "slow down", "c1-9", 1.5), c.FileAbort(1, "x", "y"),
                c.MediaPort(47301, ("vp8", "opus")), c.Hangup("", "lost")]
    for event in examples:
        seed = bytes([EVENT_NAMES.index(event.TYPE)])
        wire = event.to_wire()
        for field in dataclasses.fields(event):
            seed += b"\x01" + _value_bytes(wire[c.WIRE_NAMES.get(field.name, field.name)])
        event_seeds.append(seed + b"\x00")

    peer = c.Sealer(LINK_ID, RECEIVE_KEY)    # its send key is our receive key
    video = c.fragment(1, bytes(range(256)) * 12, 1000, True, c.CODEC_VP8)
    video += c.fragment(2, b"delta", 1033, False, c.CODEC_VP8)
    audio = c.pack_audio(c.AudioFrame(1, 1000, c.CODEC_OPUS, b"\xfc" * 40))
    controls = [c.pack_control(c.Control(c.CONTROL_KEEPALIVE)),
                c.pack_control(c.Control(c.CONTROL_KEYFRAME, 41)),
                c.pack_control(c.Nack(((1, 0, 0b101), (2, c.NACK_WHOLE_FRAME, 0)))),
                c.pack_control(c.Report(120, 15, 900))]
    hello = c.pack_hello(c.KeyExchange(PEER_PRIVATE).public, {"user": "bob", "call": 1})
    sealed = [peer.seal(c.KIND_VIDEO, inner) for inner in video]
    sealed += [peer.seal(c.KIND_AUDIO, audio)]
    sealed += [peer.seal(c.KIND_CONTROL, inner) for inner in controls]
    kinds = [(c.KIND_VIDEO, inner) for inner in video] + [(c.KIND_AUDIO, audio)] + [
        (c.KIND_CONTROL, inner) for inner in controls]
    lossy = [inner for i, inner in enumerate(video) if i != 1]      # parity rebuilds it
    media_seeds = [
        b"\x00" + _record(hello) + b"".join(map(_record, sealed)),
        b"\x00" + b"".join(map(_record, sealed[1:] + sealed[:1])),  # out of order
        b"\x01" + b"".join(_record(bytes([kind]) + inner) for kind, inner in kinds),
        b"\x03" + b"".join(_record(bytes([c.KIND_VIDEO]) + inner) for inner in lossy),
    ]
    return {"frames": frames_seeds, "events": event_seeds, "media": media_seeds}


def write_seeds() -> None:
    for target, inputs in seeds().items():
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for data in inputs:
            TARGETS[target](data)       # a seed must pass, or it is a crash already
            name = "seed-" + hashlib.sha1(data).hexdigest()[:16]
            (folder / name).write_bytes(data)


def main() -> None:
    if sys.argv[1:] == ["--seed"]:
        write_seeds()
        return
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options] "
                 f"[corpus dirs]\n       {sys.argv[0]} --seed")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
