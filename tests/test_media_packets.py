"""MEDIA PACKETS and MEDIA FLOW in chatroom.py: sealing, key agreement, payloads,
fragments with FEC and reassembly, the keyframe gate, the jitter buffer, link
statistics. No sockets, no sleeps; every clock is a number passed in."""

import json
import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chatroom as mp

LINK_ID = b"\x01\x02\x03\x04"
LINK_KEY = bytes(range(32))
SLOW = settings(deadline=None, max_examples=40,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def link(link_key=LINK_KEY, link_id=LINK_ID):
    """(a's Sealer, a's Opener, b's Sealer, b's Opener) for one link."""
    a_send, a_recv = mp.direction_keys(link_key, True)
    b_send, b_recv = mp.direction_keys(link_key, False)
    return (mp.Sealer(link_id, a_send), mp.Opener(link_id, a_recv),
            mp.Sealer(link_id, b_send), mp.Opener(link_id, b_recv))


sealed_kinds = st.sampled_from([mp.KIND_VIDEO, mp.KIND_AUDIO, mp.KIND_CONTROL])


# --- Sealing -------------------------------------------------------------------------------

def test_direction_keys_pair_up_and_differ():
    a_send, a_recv = mp.direction_keys(LINK_KEY, True)
    b_send, b_recv = mp.direction_keys(LINK_KEY, False)
    assert (a_send, a_recv) == (b_recv, b_send)
    assert len({a_send, a_recv, LINK_KEY}) == 3
    with pytest.raises(ValueError):
        mp.direction_keys(b"short", True)


@given(kind=sealed_kinds, inner=st.binary(max_size=mp.MAX_INNER_BYTES))
def test_seal_open_round_trip(kind, inner):
    sa, _, _, ob = link()
    packet = sa.seal(kind, inner)
    assert len(packet) <= mp.MAX_PACKET_BYTES
    assert mp.peek_header(packet) == (kind, LINK_ID, 1)
    assert ob.open(packet) == (kind, 1, inner)
    assert (ob.accepted, ob.refused) == (1, 0)


def test_seal_refuses_oversize_and_unsealed_kinds_without_using_a_seq():
    sa, _, _, ob = link()
    with pytest.raises(ValueError):
        sa.seal(mp.KIND_VIDEO, bytes(mp.MAX_INNER_BYTES + 1))
    with pytest.raises(ValueError):
        sa.seal(mp.KIND_HELLO, b"")
    assert ob.open(sa.seal(mp.KIND_AUDIO, b"x"))[1] == 1


def test_bad_constructor_arguments_raise_value_error():
    for args in [(b"abc", bytes(32)), (LINK_ID, bytes(31))]:
        with pytest.raises(ValueError):
            mp.Sealer(*args)
        with pytest.raises(ValueError):
            mp.Opener(*args)


@given(inner=st.binary(max_size=300), data=st.data())
def test_tampering_any_byte_is_refused(inner, data):
    sa, _, _, ob = link()
    packet = bytearray(sa.seal(mp.KIND_VIDEO, inner))
    position = data.draw(st.integers(0, len(packet) - 1))
    packet[position] ^= data.draw(st.integers(1, 255))
    assert ob.open(bytes(packet)) is None
    assert (ob.accepted, ob.refused) == (0, 1)


@given(truncate=st.integers(0, 60))
def test_truncated_packets_are_refused(truncate):
    sa, _, _, ob = link()
    packet = sa.seal(mp.KIND_AUDIO, bytes(30))
    assert ob.open(packet[:len(packet) - 1 - truncate]) is None


def test_wrong_key_or_link_id_is_refused():
    sa, _, _, _ = link()
    packet = sa.seal(mp.KIND_AUDIO, b"hello")
    _, _, _, other_key = link(link_key=bytes(32))
    _, _, _, other_id = link(link_id=b"\x09\x09\x09\x09")
    assert other_key.open(packet) is None and other_key.refused == 1
    assert other_id.open(packet) is None and other_id.refused == 1


@given(n=st.integers(1, 40), data=st.data())
def test_replay_of_any_earlier_packet_is_refused(n, data):
    sa, _, _, ob = link()
    packets = [sa.seal(mp.KIND_VIDEO, i.to_bytes(2, "big")) for i in range(n)]
    assert all(ob.open(p) is not None for p in packets)
    replay = data.draw(st.sampled_from(packets))
    assert ob.open(replay) is None
    assert (ob.accepted, ob.refused, ob.replayed) == (n, 1, 1)


def test_reflected_packet_is_refused():
    sa, oa, _, _ = link()
    assert oa.open(sa.seal(mp.KIND_CONTROL, b"\x02")) is None   # my own packet, sent back
    assert oa.refused == 1


@given(order=st.permutations(range(64)))
def test_any_order_within_the_window_is_accepted_exactly_once(order):
    sa, _, _, _ = link()
    ob = mp.Opener(LINK_ID, mp.direction_keys(LINK_KEY, False)[1], window=64)
    packets = [sa.seal(mp.KIND_AUDIO, bytes([i])) for i in range(64)]
    seqs = [ob.open(packets[i])[1] for i in order]
    assert seqs == [i + 1 for i in order]
    assert all(ob.open(p) is None for p in packets)
    assert (ob.accepted, ob.refused) == (64, 64)


def test_packets_older_than_the_window_are_refused():
    sa, _, _, _ = link()
    ob = mp.Opener(LINK_ID, mp.direction_keys(LINK_KEY, False)[1], window=8)
    packets = [sa.seal(mp.KIND_AUDIO, b"") for _ in range(20)]
    assert ob.open(packets[19]) is not None                # seq 20
    assert ob.open(packets[11]) is None                    # seq 12: 8 behind, outside
    assert ob.open(packets[12]) is not None                # seq 13: 7 behind, inside
    assert ob.replayed == 1


def test_forged_packet_does_not_move_the_replay_window():
    sa, _, _, ob = link()
    genuine = sa.seal(mp.KIND_VIDEO, b"data")
    forged = bytearray(genuine)
    forged[6:14] = (10 ** 9).to_bytes(8, "big")           # far ahead, but no valid tag
    assert ob.open(bytes(forged)) is None
    assert ob.open(genuine) == (mp.KIND_VIDEO, 1, b"data")


def test_huge_sequence_jump_is_cheap_and_later_packets_still_work():
    _, _, _, ob = link()
    send_key = mp.direction_keys(LINK_KEY, True)[0]
    sealer = mp.Sealer(LINK_ID, send_key)
    sealer.seq = 2 ** 63                                  # as if a long call went by
    assert ob.open(sealer.seal(mp.KIND_AUDIO, b"a"))[1] == 2 ** 63 + 1
    assert ob.open(sealer.seal(mp.KIND_AUDIO, b"b"))[1] == 2 ** 63 + 2


@given(blob=st.binary(max_size=1300))
def test_random_bytes_never_raise(blob):
    _, _, _, ob = link()
    framed = bytes([mp.MEDIA_MAGIC, mp.KIND_VIDEO]) + LINK_ID + blob
    hello = bytes([mp.MEDIA_MAGIC, mp.KIND_HELLO, mp.HELLO_VERSION]) + blob
    for packet in (blob, framed, hello):
        assert ob.open(packet) is None
        header = mp.peek_header(packet)
        assert header is None or header[0] in (1, 2, 3, 4)
        result = mp.unpack_hello(packet)
        assert result is None or (len(result[0]) == 32 and type(result[1]) is dict)
        mp.unpack_video(packet)
        mp.unpack_audio(packet)
        mp.unpack_control(packet)
        reassembler = mp.Reassembler()
        assert reassembler.add(packet, 0) == []


def test_peek_header_cases():
    assert mp.peek_header(b"") is None
    assert mp.peek_header(bytes(40)) is None                          # wrong magic
    assert mp.peek_header(bytes([mp.MEDIA_MAGIC, 9]) + bytes(40)) is None  # unknown kind
    assert mp.peek_header(bytes([mp.MEDIA_MAGIC, mp.KIND_AUDIO]) + bytes(20)) is None  # short
    hello = mp.pack_hello(bytes(32), {})
    assert mp.peek_header(hello) == (mp.KIND_HELLO, b"", 0)


# --- HELLO and key agreement ---------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10 ** 12, 10 ** 12)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)


@given(key=st.binary(min_size=32, max_size=32),
       info=st.dictionaries(st.text(max_size=10), json_values, max_size=6))
def test_hello_round_trip(key, info):
    size = len(json.dumps(info, ensure_ascii=False, separators=(",", ":")).encode())
    if size > mp.MAX_HELLO_JSON_BYTES:
        with pytest.raises(ValueError):
            mp.pack_hello(key, info)
        return
    packet = mp.pack_hello(key, info)
    assert len(packet) <= mp.MAX_PACKET_BYTES
    assert mp.unpack_hello(packet) == (key, info)


@pytest.mark.parametrize("body", [
    b"", b"not json", b"[1, 2]", b'"text"', b"17", b'{"a": 1, "a": 2}', b'{"a": NaN}',
    b'{"a": Infinity}', b'{"a": -Infinity}', b'{"a": 1e999}', b'{"a": "\\ud800"}',
    b'{"a": "\xff"}', b'{"a": 1} trailing', b"\xef\xbb\xbf{}", b"{" + b" " * 1000 + b"}",
    b"[" * 600 + b"]" * 600,
])
def test_malformed_hello_bodies_are_refused(body):
    packet = bytes([mp.MEDIA_MAGIC, mp.KIND_HELLO, mp.HELLO_VERSION]) + bytes(32) + body
    assert mp.unpack_hello(packet) is None


def test_hello_with_wrong_version_or_kind_is_refused():
    good = mp.pack_hello(bytes(32), {"user": "ana"})
    assert mp.unpack_hello(good) == (bytes(32), {"user": "ana"})
    for position, value in [(0, 0), (1, mp.KIND_VIDEO), (2, 2)]:
        bad = bytearray(good)
        bad[position] = value
        assert mp.unpack_hello(bytes(bad)) is None


@pytest.mark.parametrize("key, info", [
    (bytes(31), {}), (bytes(32), []), (bytes(32), {"x": float("nan")}),
    (bytes(32), {"x": object()}), (bytes(32), {"x": "y" * 1000}),
])
def test_pack_hello_refuses_what_it_cannot_send(key, info):
    with pytest.raises(ValueError):
        mp.pack_hello(key, info)


def test_key_exchange_both_sides_agree():
    alice, bob = mp.KeyExchange(), mp.KeyExchange()
    a, b = alice.agree(bob.public), bob.agree(alice.public)
    assert (a.link_id, a.link_key, a.safety_code) == (b.link_id, b.link_key, b.safety_code)
    assert a.i_am_a != b.i_am_a
    assert a.i_am_a == (alice.public < bob.public)
    assert len(a.link_id) == 4 and len(a.link_key) == 32
    assert re.fullmatch(r"\d{3} \d{3}", a.safety_code)
    assert a.link_key.hex() not in repr(a)              # the secret stays out of logs
    # The agreed link carries media both ways.
    a_send, a_recv = mp.direction_keys(a.link_key, a.i_am_a)
    b_send, b_recv = mp.direction_keys(b.link_key, b.i_am_a)
    assert mp.Opener(b.link_id, b_recv).open(mp.Sealer(a.link_id, a_send).seal(1, b"v"))
    assert mp.Opener(a.link_id, a_recv).open(mp.Sealer(b.link_id, b_send).seal(2, b"a"))


def test_third_party_key_gives_a_different_link_and_code():
    # Fixed keys: with random ones the codes would collide once in 10**6 runs.
    alice, bob, mallory = (mp.KeyExchange(bytes([n]) * 32) for n in (1, 2, 3))
    honest, tampered = alice.agree(bob.public), alice.agree(mallory.public)
    assert honest.link_key != tampered.link_key and honest.link_id != tampered.link_id
    assert honest.safety_code != tampered.safety_code
    assert honest.safety_code != mallory.agree(bob.public).safety_code


@pytest.mark.parametrize("bad", [b"", bytes(31), bytes(33), bytes(32), "x" * 32, None])
def test_bad_public_keys_raise_value_error(bad):
    with pytest.raises(ValueError):                     # bytes(32) is a low-order point
        mp.KeyExchange().agree(bad)


def test_reflected_hello_key_raises_value_error():
    me = mp.KeyExchange()
    with pytest.raises(ValueError):
        me.agree(me.public)


# --- Inner payloads ------------------------------------------------------------------------

@given(seq=st.integers(0, 2 ** 32 - 1), capture=st.integers(0, 2 ** 64 - 1),
       codec=st.sampled_from([mp.CODEC_OPUS, mp.CODEC_PCM16]),
       payload=st.binary(max_size=mp.MAX_AUDIO_PAYLOAD_BYTES))
def test_audio_round_trip(seq, capture, codec, payload):
    frame = mp.AudioFrame(seq, capture, codec, payload)
    inner = mp.pack_audio(frame)
    assert mp.unpack_audio(inner) == frame
    mp.Sealer(LINK_ID, bytes(32)).seal(mp.KIND_AUDIO, inner)    # fits one packet


@pytest.mark.parametrize("frame", [
    mp.AudioFrame(1, 0, 9, b""), mp.AudioFrame(-1, 0, 1, b""), mp.AudioFrame(2 ** 32, 0, 1, b""),
    mp.AudioFrame(1, 0, 1, bytes(mp.MAX_AUDIO_PAYLOAD_BYTES + 1)),
])
def test_pack_audio_refuses_bad_frames(frame):
    with pytest.raises(ValueError):
        mp.pack_audio(frame)


@given(last=st.integers(0, 2 ** 32 - 1))
def test_control_round_trip(last):
    for control in (mp.Control(mp.CONTROL_KEYFRAME, last), mp.Control(mp.CONTROL_KEEPALIVE)):
        assert mp.unpack_control(mp.pack_control(control)) == control


def test_control_malformed():
    for inner in (b"", b"\x02\x00", b"\x01\x00\x00\x00", b"\x01" + bytes(5), b"\x07"):
        assert mp.unpack_control(inner) is None
    for control in (mp.Control(9), mp.Control(mp.CONTROL_KEYFRAME, -1),
                    mp.Control(mp.CONTROL_KEEPALIVE, 5)):
        with pytest.raises(ValueError):
            mp.pack_control(control)


def test_bye_packs_to_one_byte_and_back():
    bye = mp.Control(mp.CONTROL_BYE)
    assert mp.pack_control(bye) == bytes([mp.CONTROL_BYE]) == b"\x05"
    assert mp.unpack_control(b"\x05") == bye
    assert mp.CONTROL_BYE not in (mp.CONTROL_KEYFRAME, mp.CONTROL_KEEPALIVE,
                                  mp.CONTROL_NACK, mp.CONTROL_REPORT)
    for inner in (b"\x05\x00", b"\x05" + bytes(4), b"\x05\x05"):    # a bye has no body
        assert mp.unpack_control(inner) is None
    with pytest.raises(ValueError):
        mp.pack_control(mp.Control(mp.CONTROL_BYE, 1))
    # A peer that predates a control type drops it, as unknown: so do we, for the
    # types after the bye, which is how an older peer ignores a bye.
    for unknown in (6, 7, 0x7F, 0xFF):
        assert mp.unpack_control(bytes([unknown])) is None


def test_only_an_authentic_new_bye_opens():
    """A bye ends a direct call, so it counts only as sealed media does: one
    sealed by the peer under this link's key, new. A replayed bye, a
    forged one (another key, or this link's id with bytes changed), and our
    own reflected back are all refused before the control is read."""
    sa, oa, _, ob = link()
    sealed = sa.seal(mp.KIND_CONTROL, mp.pack_control(mp.Control(mp.CONTROL_BYE)))
    kind, _, inner = ob.open(sealed)
    assert kind == mp.KIND_CONTROL and mp.unpack_control(inner) == mp.Control(mp.CONTROL_BYE)
    assert ob.open(sealed) is None and ob.replayed == 1         # replayed
    forger, _, _, _ = link(link_key=bytes(32))                   # same link id, wrong key
    forged = forger.seal(mp.KIND_CONTROL, b"\x05")
    assert mp.peek_header(forged)[:2] == (mp.KIND_CONTROL, LINK_ID)
    assert ob.open(forged) is None
    keepalive = sa.seal(mp.KIND_CONTROL, b"\x02")              # a keepalive made a bye
    tampered = keepalive[:mp.PACKET_OVERHEAD_BYTES - 16] + bytes(
        [keepalive[-17] ^ 0x02 ^ 0x05]) + keepalive[-16:]
    assert len(tampered) == len(keepalive) and tampered != keepalive
    assert ob.open(tampered) is None
    assert oa.open(sealed) is None                              # reflected to its sender
    assert ob.open(keepalive) is not None                       # the real one still opens
    assert (ob.accepted, ob.refused) == (2, 3)


def test_video_pack_unpack_and_refusals():
    frag = mp.VideoFragment(7, 123, True, False, mp.CODEC_VP8, 2, 3, 5, 0, b"abc")
    assert mp.unpack_video(mp.pack_video(frag)) == frag
    bad = [frag.__class__(**{**frag.__dict__, **change}) for change in (
        {"codec": 9}, {"index": 3}, {"count": 0}, {"group": 0}, {"length_xor": 4},
        {"parity": True, "index": 1}, {"frame_id": 2 ** 32}, {"data": bytes(2000)})]
    for fragment in bad:
        with pytest.raises(ValueError):
            mp.pack_video(fragment)
    inner = bytearray(mp.pack_video(frag))
    inner[12] |= 0x80                                     # an unknown flag bit
    assert mp.unpack_video(bytes(inner)) is None


# --- Fragmenting and reassembly ------------------------------------------------------------

def frame_bytes(size, seed):
    return random.Random(seed).randbytes(size)


def unpacked(inners):
    return [mp.unpack_video(i) for i in inners]


@SLOW
@given(size=st.integers(0, 200_000), seed=st.integers(0, 2 ** 32),
       keyframe=st.booleans(), codec=st.sampled_from([mp.CODEC_VP8, mp.CODEC_JPEG]))
def test_any_frame_size_round_trips(size, seed, keyframe, codec):
    data = frame_bytes(size, seed)
    inners = mp.fragment(41, data, 1_700_000_000_000, keyframe, codec)
    sealer = mp.Sealer(LINK_ID, bytes(32))
    assert all(len(sealer.seal(mp.KIND_VIDEO, i)) <= mp.MAX_PACKET_BYTES for i in inners)
    frags = unpacked(inners)
    data_count = -(-max(size, 1) // mp.VIDEO_FRAGMENT_BYTES)
    assert sum(not f.parity for f in frags) == data_count
    assert sum(f.parity for f in frags) == -(-data_count // mp.FEC_GROUP)
    r = mp.Reassembler()
    out = [frame for inner in inners for frame in r.add(inner, 0)]
    assert out == [mp.Frame(41, data, 1_700_000_000_000, keyframe, codec)]
    assert (r.completed, r.repaired, r.in_progress, r.held_bytes) == (1, 0, 0, 0)


@SLOW
@given(size=st.integers(1, 60_000), seed=st.integers(0, 2 ** 32), data=st.data(),
       max_fragment=st.integers(50, mp.VIDEO_FRAGMENT_BYTES), fec_group=st.integers(1, 8))
def test_one_loss_per_fec_group_is_repaired(size, seed, data, max_fragment, fec_group):
    payload = frame_bytes(size, seed)
    inners = mp.fragment(3, payload, 0, False, mp.CODEC_VP8, max_fragment, fec_group)
    groups: dict[int, list[int]] = {}
    for position, f in enumerate(unpacked(inners)):
        groups.setdefault(f.index if f.parity else f.index // f.group, []).append(position)
    lost = {data.draw(st.sampled_from(members + [None])) for members in groups.values()}
    order = data.draw(st.permutations([i for i in range(len(inners)) if i not in lost]))
    r = mp.Reassembler()
    out = [frame for i in order for frame in r.add(inners[i], 0)]
    assert [f.data for f in out] == [payload]
    assert r.completed == 1 and r.incomplete == 0


def test_repair_recovers_the_true_length_of_a_short_last_fragment():
    payload = frame_bytes(1000 * 4 + 7, 1)
    inners = mp.fragment(1, payload, 5, True, mp.CODEC_VP8, max_fragment=1000)
    assert len(inners) == 6                             # 5 data (last has 7 bytes) + parity
    r = mp.Reassembler()
    out = [frame for i in (0, 1, 2, 3, 5) for frame in r.add(inners[i], 0)]
    assert [f.data for f in out] == [payload] and r.repaired == 1


@SLOW
@given(seed=st.integers(0, 2 ** 32), loss=st.floats(0, 0.5), dup=st.floats(0, 0.3),
       spread=st.integers(0, 40), ms_per_packet=st.sampled_from([0.1, 5.0, 40.0]))
def test_loss_duplication_and_reordering_never_break_the_rules(seed, loss, dup, spread,
                                                               ms_per_packet):
    rng = random.Random(seed)
    sent, wire = {}, []
    for frame_id in range(1, 40):
        payload = rng.randbytes(rng.choice([0, 300, 3000, 12000, 40000]))
        sent[frame_id] = payload
        for inner in mp.fragment(frame_id, payload, frame_id * 33, frame_id % 10 == 1,
                                 mp.CODEC_VP8):
            if rng.random() >= loss:
                wire.append(inner)
            if rng.random() < dup:
                wire.append(inner)
    # Reorder: each packet moves up to `spread` places.
    keyed = sorted((i + rng.uniform(0, spread), inner) for i, inner in enumerate(wire))
    r = mp.Reassembler(max_frames=4, max_bytes=100_000)
    delivered = []
    for step, (_, inner) in enumerate(keyed):
        delivered += r.add(inner, step * ms_per_packet)     # 40 ms: frames go stale
        assert r.in_progress <= 4 and r.held_bytes <= 100_000
    ids = [f.frame_id for f in delivered]
    assert ids == sorted(set(ids))                      # in order, never twice
    assert all(f.data == sent[f.frame_id] for f in delivered)
    assert r.completed == len(delivered)


def test_stale_frame_is_dropped_and_its_late_fragments_refused():
    inners = mp.fragment(1, bytes(3000), 0, True, mp.CODEC_VP8)
    r = mp.Reassembler(stale_ms=500)
    assert r.add(inners[0], now_ms=0) == []
    assert r.add(inners[1], now_ms=400) == []
    assert r.expire(now_ms=501) == 1
    assert (r.incomplete, r.in_progress, r.held_bytes) == (1, 0, 0)
    assert r.add(inners[2], now_ms=502) == [] and r.late == 1
    later = mp.fragment(2, b"x", 0, False, mp.CODEC_VP8)
    assert [f.frame_id for f in r.add(later[0], now_ms=503)] == [2]


def test_newer_complete_frame_passes_over_older_ones():
    old = mp.fragment(1, bytes(5000), 0, True, mp.CODEC_VP8)
    new = mp.fragment(2, b"new", 0, False, mp.CODEC_VP8)
    r = mp.Reassembler()
    r.add(old[0], 0)
    assert [f.frame_id for f in r.add(new[0], 1)] == [2]
    assert r.incomplete == 1 and r.in_progress == 0
    assert r.add(old[1], 2) == [] and r.late == 1       # never older than one delivered
    assert r.add(new[1], 3) == [] and r.duplicates == 1  # its parity came after


def test_duplicate_and_inconsistent_fragments():
    inners = mp.fragment(5, bytes(3000), 0, False, mp.CODEC_VP8)
    r = mp.Reassembler()
    r.add(inners[0], 0)
    assert r.add(inners[0], 0) == [] and r.duplicates == 1
    liar = mp.unpack_video(inners[1])
    liar = mp.VideoFragment(**{**liar.__dict__, "count": 7})
    assert r.add(mp.pack_video(liar), 0) == [] and r.malformed == 1
    assert [f.frame_id for f in r.add(inners[1], 0) + r.add(inners[2], 0)] == [5]


def test_parity_contradicting_the_data_is_dropped_not_raised():
    inners = mp.fragment(9, bytes(range(200)) * 10, 0, True, mp.CODEC_VP8, max_fragment=500)
    parity = mp.unpack_video(inners[-1])
    lying = mp.VideoFragment(**{**parity.__dict__, "length_xor": parity.length_xor ^ 0x3FF})
    r = mp.Reassembler()
    out = [f for i in inners[1:-1] for f in r.add(i, 0)] + r.add(mp.pack_video(lying), 0)
    assert out == [] and r.malformed == 1 and r.incomplete == 1 and r.in_progress == 0


def test_frames_in_progress_and_bytes_are_capped():
    r = mp.Reassembler(max_frames=3, max_bytes=5000)
    for frame_id in range(1, 10):
        r.add(mp.fragment(frame_id, bytes(3000), 0, False, mp.CODEC_VP8)[0], frame_id)
        assert r.in_progress <= 3 and r.held_bytes <= 5000
    assert r.incomplete >= 6
    r.add(mp.fragment(2, bytes(3000), 0, False, mp.CODEC_VP8)[1], 20)  # given up before
    assert r.late == 1


# --- Keyframe gate -------------------------------------------------------------------------

def vp8(frame_id, keyframe=False, codec=mp.CODEC_VP8):
    return mp.Frame(frame_id, b"", 0, keyframe, codec)


def test_gate_waits_for_a_keyframe_after_a_gap_and_rate_limits_requests():
    gate = mp.KeyframeGate(request_interval_ms=300)
    assert gate.check(vp8(1), 0) == mp.GateVerdict(False, True)       # can't start on a delta
    assert gate.check(vp8(2, keyframe=True), 10) == mp.GateVerdict(True, False)
    assert gate.check(vp8(3), 20) == mp.GateVerdict(True, False)
    assert gate.check(vp8(5), 100) == mp.GateVerdict(False, False)    # 4 lost; asked at 0
    assert gate.last_frame_id == 5
    assert gate.check(vp8(6), 300) == mp.GateVerdict(False, True)     # 300 ms on: ask
    assert gate.check(vp8(7), 599) == mp.GateVerdict(False, False)
    assert gate.check(vp8(8), 600) == mp.GateVerdict(False, True)     # no answer: ask again
    assert gate.check(vp8(9, keyframe=True), 610) == mp.GateVerdict(True, False)
    assert gate.check(vp8(10), 620) == mp.GateVerdict(True, False)
    assert gate.state is mp.GateState.DECODING
    assert (gate.skipped, gate.requests) == (5, 3)


def test_gate_never_holds_back_jpeg():
    gate = mp.KeyframeGate()
    for frame_id in (1, 2, 5, 9):
        assert gate.check(vp8(frame_id, codec=mp.CODEC_JPEG), frame_id) == mp.GateVerdict(
            True, False)
    assert gate.check(vp8(10), 20).decode is False       # switched to VP8 on a delta


def test_gate_after_decoder_failure():
    gate = mp.KeyframeGate()
    gate.check(vp8(1, keyframe=True), 0)
    assert gate.decoder_failed(10) is True
    assert gate.check(vp8(2), 20) == mp.GateVerdict(False, False)
    assert gate.check(vp8(3, keyframe=True), 30).decode


# --- Jitter buffer -------------------------------------------------------------------------

def play(buffer, arrivals, pops, phase=7.0, frame_ms=20):
    """Run the playback clock over `arrivals` [(arrival_ms, seq)]: a pop at phase + k * frame_ms
    for k in range(pops); pushes happen first when they share a time. Returns pop results,
    checking the capacity after every step."""
    arrivals = sorted(arrivals)
    results, i = [], 0
    for k in range(pops):
        now = phase + k * frame_ms
        while i < len(arrivals) and arrivals[i][0] <= now:
            buffer.push(arrivals[i][1], arrivals[i][1].to_bytes(4, "big"), arrivals[i][0])
            i += 1
            assert buffer.depth <= buffer.capacity
        results.append(buffer.pop())
        assert buffer.depth <= buffer.capacity
    return results


def played(results):
    return [int.from_bytes(p, "big") for kind, p in results if kind == "frame"]


@SLOW
@given(seed=st.integers(0, 2 ** 32), jitter=st.integers(0, 35), phase=st.floats(0, 19.9))
def test_in_order_arrivals_with_jitter_play_every_frame(seed, jitter, phase):
    rng = random.Random(seed)
    arrivals, last = [], 0.0
    for seq in range(300):                   # in order: never before the previous packet
        last = max(last, 20.0 * seq + 5 + rng.uniform(0, jitter))
        arrivals.append((last, seq))
    buffer = mp.JitterBuffer()
    results = play(buffer, arrivals, 340, phase)
    assert played(results) == list(range(300))
    assert ("lost", None) not in results
    assert (buffer.played, buffer.dropped, buffer.late) == (300, 0, 0)
    assert buffer.target_ms <= 80


def test_a_lost_frame_yields_lost_and_play_goes_on():
    buffer = mp.JitterBuffer(min_delay_ms=40)           # 6 is here when 5 is due
    arrivals = [(20.0 * seq, seq) for seq in range(20) if seq != 5]
    results = play(buffer, arrivals, 23)
    kinds = [kind for kind, _ in results if kind != "empty"]
    assert kinds == ["frame"] * 5 + ["lost"] + ["frame"] * 14
    assert played(results) == [s for s in range(20) if s != 5]
    assert buffer.concealed == 1


def test_reordering_within_the_target_delay_is_repaired():
    buffer = mp.JitterBuffer(min_delay_ms=60)
    arrivals = []
    for seq in range(0, 100, 2):              # each pair arrives swapped, 20 ms apart
        arrivals += [(20.0 * seq + 20, seq), (20.0 * seq + 1, seq + 1)]
    results = play(buffer, arrivals, 110)
    assert played(results) == list(range(100))
    assert buffer.concealed == 0 and buffer.late == 0


def test_underrun_gives_empty_then_rebuffers():
    buffer = mp.JitterBuffer(min_delay_ms=40)
    assert buffer.pop() == ("empty", None)               # nothing yet
    buffer.push(0, b"a", 0)
    assert buffer.pop() == ("empty", None)               # 20 ms buffered, target 40
    buffer.push(1, b"b", 20)
    assert buffer.pop() == ("frame", b"a")
    assert buffer.pop() == ("frame", b"b")
    assert buffer.pop() == ("empty", None)               # underrun
    assert buffer.state is mp.JitterState.BUFFERING
    buffer.push(0, b"old", 100)                          # behind the playout point
    assert buffer.late == 1
    buffer.push(3, b"d", 100)
    buffer.push(4, b"e", 100)
    assert buffer.pop() == ("frame", b"d")               # 2 lost during the stall: skipped
    assert buffer.underruns == 3 and buffer.played == 3


@given(times=st.lists(st.floats(0, 10_000), min_size=2, max_size=200))
def test_target_stays_within_bounds(times):
    buffer = mp.JitterBuffer(min_delay_ms=20, max_delay_ms=80)
    for seq, arrival in enumerate(times):
        buffer.push(seq, b"", arrival)
        assert 20 <= buffer.target_ms <= 80
        assert buffer.depth <= buffer.capacity


def test_target_grows_with_jitter_and_shrinks_back():
    buffer = mp.JitterBuffer()
    for seq in range(50):                                 # steady: one frame of delay
        buffer.push(seq, b"", 20.0 * seq)
    assert buffer.target_ms == 20 and buffer.jitter_ms == 0
    for seq in range(50, 150):                            # +-30 ms of jitter
        buffer.push(seq, b"", 20.0 * seq + (30 if seq % 2 else 0))
    assert buffer.target_ms == 80                         # 2 x 28 + 20, rounded up, capped
    for seq in range(150, 400):
        buffer.push(seq, b"", 20.0 * seq)
    assert buffer.target_ms == 20


def test_capacity_drops_the_oldest():
    buffer = mp.JitterBuffer(capacity=10)
    for seq in range(25):
        buffer.push(seq, bytes([seq]), 0)
    assert buffer.depth == 10 and buffer.dropped == 15
    assert buffer.pop() == ("frame", bytes([15]))


def test_duplicates_are_dropped():
    buffer = mp.JitterBuffer()
    buffer.push(1, b"a", 0)
    buffer.push(1, b"b", 1)
    assert buffer.depth == 1 and buffer.duplicates == 1
    assert buffer.pop() == ("frame", b"a")


def test_catches_up_when_too_much_is_buffered():
    buffer = mp.JitterBuffer()
    for seq in range(30):                                 # a burst: 600 ms at once
        buffer.push(seq, bytes([seq]), 20.0 * seq)        # no jitter: target 20 ms
    first = [buffer.pop() for _ in range(9)]
    assert buffer.dropped == 0                            # 180 ms over target: patience
    rest = [buffer.pop() for _ in range(10)]
    assert buffer.dropped == 9 and buffer.depth == 2      # one dropped per pop, then stop
    seqs = [p[0] for kind, p in first + rest if kind == "frame"]
    assert len(seqs) == 19 and seqs == sorted(seqs) and seqs[-1] == 27


def test_a_huge_jump_resynchronises_instead_of_concealing_for_ever():
    buffer = mp.JitterBuffer()
    buffer.push(1, b"a", 0)
    assert buffer.pop() == ("frame", b"a")
    buffer.push(2, b"b", 20)
    buffer.push(10 ** 6, b"z", 20)
    assert buffer.pop() == ("frame", b"b")
    assert buffer.pop() == ("frame", b"z")


@given(events=st.lists(st.one_of(st.integers(0, 120), st.just("pop")), max_size=300),
       jitter=st.floats(0, 200))
def test_random_pushes_and_pops_keep_the_buffer_sane(events, jitter):
    buffer = mp.JitterBuffer(capacity=20)
    played_seqs, now = [], 0.0
    for event in events:
        if event == "pop":
            now += 20
            kind, payload = buffer.pop()
            assert kind in ("frame", "lost", "empty") and (payload is None) == (kind != "frame")
            if payload is not None:
                played_seqs.append(int.from_bytes(payload, "big"))
        else:
            buffer.push(event, event.to_bytes(2, "big"), now + jitter * (event % 3))
        assert buffer.depth <= 20 and 20 <= buffer.target_ms <= 80
    assert played_seqs == sorted(set(played_seqs))          # in order, never twice
    assert buffer.played == len(played_seqs)


def test_bad_jitter_buffer_settings_raise():
    for kwargs in ({"frame_ms": 0}, {"min_delay_ms": 90}, {"capacity": 0}):
        with pytest.raises(ValueError):
            mp.JitterBuffer(**kwargs)


# --- Link statistics -----------------------------------------------------------------------

def test_loss_from_sequence_gaps_across_intervals():
    stats = mp.LinkStats(now_ms=0)
    for seq in range(1, 11):
        if seq not in (3, 4, 8):
            stats.packet(seq, 1000, now_ms=seq)
    first = stats.snapshot(1000)
    assert first["loss"] == 0.3 and first["kbps"] == 56.0
    for seq in range(13, 21):                             # 11 and 12 lost at the boundary
        stats.packet(seq, 100, now_ms=1000 + seq)
    assert stats.snapshot(2000)["loss"] == 0.2
    assert stats.snapshot(3000)["loss"] == 0.0            # nothing received: nothing known


def test_reordered_stragglers_do_not_count_as_loss():
    stats = mp.LinkStats(0)
    for seq in (1, 2, 4):
        stats.packet(seq, 10, 0)
    assert stats.snapshot(1000)["loss"] == 0.25
    for seq in (3, 5, 6):                                 # 3 was late, not lost
        stats.packet(seq, 10, 1000)
    assert stats.snapshot(2000)["loss"] == 0.0


def test_latency_median_fps_audio_and_dropped():
    stats = mp.LinkStats(0)
    assert stats.snapshot(1000)["latency_ms"] is None
    for capture, now in ((1000, 1040), (1033, 1100), (1066, 1086)):
        stats.frame_shown(capture, now)
    for _ in range(50):
        stats.audio_frame()
    stats.refused()
    snap = stats.snapshot(2000)
    assert snap == {"video_fps": 3.0, "audio_frames": 50, "loss": 0.0, "latency_ms": 40.0,
                    "delay_ms": 40.0, "kbps": 0.0, "dropped": 1, "freeze_ms": 60}
    stats.frame_shown(0, 1110)
    stats.frame_shown(0, 1130)
    stats.refused()
    snap = stats.snapshot(2500)
    assert snap["latency_ms"] == 1120.0 and snap["video_fps"] == 4.0 and snap["dropped"] == 2
    assert snap["freeze_ms"] == 24                      # from 1086, the last frame before
    assert stats.snapshot(3000)["freeze_ms"] is None    # no frame: video_fps 0 says it


def test_latency_leaves_out_lip_syncs_hold_and_delay_keeps_it():
    """latency_ms is capture to decode; a frame lip sync held back for its
    sound counts that wait in delay_ms (capture to shown) only."""
    stats = mp.LinkStats(0)
    stats.frame_shown(1000, 1090, held_ms=60)
    stats.frame_shown(1033, 1113, held_ms=50)
    stats.frame_shown(1066, 1146, held_ms=50)
    snap = stats.snapshot(2000)
    assert snap["latency_ms"] == 30.0 and snap["delay_ms"] == 80.0
