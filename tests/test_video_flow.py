"""Video repair and rate in chatroom.py's MEDIA PACKETS and MEDIA FLOW: the Nack and
Report control messages (hostile bodies refused), reassembly that waits for a
repair, the receiver's Nacks, the sender's fragment cache and its bounded
Retransmitter, the receiver's ReportMeter and the sender's RateController, and
the encoders taking a new bitrate and size, and the simulation bench/video_sim.py
runs on them. No sockets, no sleeps: every clock is
a number passed in."""

import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chatroom as mp

SLOW = settings(deadline=None, max_examples=60,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

u32 = st.integers(0, 2 ** 32 - 1)
entry = st.one_of(st.tuples(u32, st.integers(0, 0xFFFE), st.integers(0, 0xFFFF)),
                  st.tuples(u32, st.just(mp.NACK_WHOLE_FRAME), st.just(0)))


# --- Nack and Report: the bytes ---------------------------------------------------------------

@given(entries=st.lists(entry, min_size=1, max_size=mp.MAX_NACK_ENTRIES))
def test_nack_round_trips_and_stays_small(entries):
    nack = mp.Nack(tuple(entries))
    inner = mp.pack_control(nack)
    assert len(inner) == 2 + 8 * len(entries) <= 130
    assert mp.unpack_control(inner) == nack
    assert mp.unpack_control(inner).type == mp.CONTROL_NACK


@given(loss=st.integers(0, 10000), delay=st.integers(0, 0xFFFF), kbps=u32)
def test_report_round_trips(loss, delay, kbps):
    report = mp.Report(loss, delay, kbps)
    inner = mp.pack_control(report)
    assert len(inner) == 9 and mp.unpack_control(inner) == report


@given(body=st.binary(max_size=200), kind=st.sampled_from(
    [mp.CONTROL_KEYFRAME, mp.CONTROL_KEEPALIVE, mp.CONTROL_NACK, mp.CONTROL_REPORT, 0, 5, 255]))
def test_any_control_bytes_parse_to_what_packs_back_or_to_none(body, kind):
    inner = bytes([kind]) + body
    control = mp.unpack_control(inner)
    assert control is None or mp.pack_control(control) == inner


def test_hostile_control_bodies_are_refused():
    entry_bytes = (7).to_bytes(4, "big") + (1).to_bytes(2, "big") + (3).to_bytes(2, "big")
    whole_with_mask = (7).to_bytes(4, "big") + b"\xff\xff\x00\x01"
    for inner in [
        bytes([mp.CONTROL_NACK]),                                   # no count
        bytes([mp.CONTROL_NACK, 0]),                                # no entries
        bytes([mp.CONTROL_NACK, 1]) + entry_bytes[:-1],             # short
        bytes([mp.CONTROL_NACK, 1]) + entry_bytes + b"\x00",        # long
        bytes([mp.CONTROL_NACK, 2]) + entry_bytes,                  # count says more
        bytes([mp.CONTROL_NACK, 17]) + entry_bytes * 17,            # too many entries
        bytes([mp.CONTROL_NACK, 255]) + entry_bytes * 255,
        bytes([mp.CONTROL_NACK, 1]) + whole_with_mask,              # whole frame, and a mask
        bytes([mp.CONTROL_REPORT]) + bytes(7),                      # short report
        bytes([mp.CONTROL_REPORT]) + bytes(9),                      # long report
        bytes([mp.CONTROL_REPORT]) + (10001).to_bytes(2, "big") + bytes(6),  # loss > 100%
    ]:
        assert mp.unpack_control(inner) is None, inner.hex()


def test_packing_refuses_what_it_could_not_send():
    for bad in [mp.Nack(()), mp.Nack(((1, 2, 3),) * 17), mp.Nack(((1, mp.NACK_WHOLE_FRAME, 1),)),
                mp.Nack(((2 ** 32, 0, 0),)), mp.Nack(((1, 0, 0x10000),)),
                mp.Report(10001, 0, 0), mp.Report(0, 0x10000, 0), mp.Report(0, 0, -1),
                mp.Control(mp.CONTROL_NACK)]:
        with pytest.raises(ValueError):
            mp.pack_control(bad)


@given(lost=st.lists(st.tuples(u32, st.one_of(st.none(), st.sets(st.integers(0, 0xFFFE),
                                                                    max_size=60))),
                     max_size=30, unique_by=lambda x: x[0]))
def test_nacks_asking_name_exactly_what_was_lost(lost):
    nacks = mp.Nack.asking(lost)
    wanted = [w for nack in nacks for w in mp.unpack_control(mp.pack_control(nack)).wanted()]
    expected = [(f, None) for f, i in lost if i is None] + [
        (f, x) for f, i in lost if i is not None for x in i]
    assert sorted(wanted, key=repr) == sorted(expected, key=repr)
    assert all(1 <= len(n.entries) <= mp.MAX_NACK_ENTRIES for n in nacks)


def test_nack_entries_are_compact():
    (nack,) = mp.Nack.asking([(9, [3, 4, 19, 20, 40])])
    assert nack.entries == ((9, 3, 0b1 | 1 << 15), (9, 20, 0), (9, 40, 0))


# --- fragments without parity, and reassembly that waits for a repair -------------------------

def frames(count, size=4000, parity=True, start=1):
    return {i: mp.fragment(i, random.Random(i).randbytes(size), i * 33, i == 1, mp.CODEC_VP8,
                           parity=parity) for i in range(start, start + count)}


def test_fragment_without_parity_sends_data_only():
    inners = mp.fragment(1, bytes(6000), 0, True, mp.CODEC_VP8, parity=False)
    assert [mp.unpack_video(i).parity for i in inners] == [False] * 6
    r = mp.Reassembler()
    assert [f.data for i in inners for f in r.add(i, 0)] == [bytes(6000)]


def test_a_lost_fragment_is_named_once_and_the_newer_frame_waits_for_its_repair():
    sent = frames(2)                    # 4 data fragments + 1 parity each
    r = mp.Reassembler(hold_ms=100)
    for i in (0, 3, 4):                 # 1 and 2 lost: parity rebuilds one of them
        assert r.add(sent[1][i], 0) == []
    assert r.lost(1) == [(1, [1])]      # its parity came: the group can't grow
    assert r.lost(2) == []              # once
    assert r.add(sent[2][0], 5) == [] and r.lost(5) == []
    assert [r.add(i, 6) for i in sent[2][1:]] == [[]] * 4     # frame 2 complete: it waits
    out = r.add(sent[1][1], 8)          # the repair: both go, in order
    assert [f.frame_id for f in out] == [1, 2]
    assert (r.recovered, r.repaired, r.resent, r.incomplete) == (1, 1, 1, 0)
    assert r.repair_rtt_ms == 7


def test_without_a_repair_the_older_frame_is_given_up_after_the_wait():
    sent = frames(2)
    r = mp.Reassembler(hold_ms=50)
    r.add(sent[1][0], 0)                # data 1..3 and the parity never come
    done = [f for i in sent[2] for f in r.add(i, 10)]
    assert done == [] and r.lost(10) == [(1, [1, 2, 3])]
    assert r.poll(59) == []
    assert [f.frame_id for f in r.poll(61)] == [2]
    assert (r.incomplete, r.in_progress, r.held_bytes) == (1, 0, 0)
    assert r.add(sent[1][1], 62) == [] and r.late == 1


def test_no_hold_gives_an_older_frame_up_at_once_as_before():
    sent = frames(2)
    r = mp.Reassembler()                # hold_ms 0: no repair to wait for
    r.add(sent[1][0], 0)
    assert [f.frame_id for i in sent[2] for f in r.add(i, 1)] == [2]
    assert r.incomplete == 1


def test_frames_nothing_came_of_are_asked_for_whole_and_awaited():
    sent = frames(4)
    r = mp.Reassembler(hold_ms=100)
    assert [f.frame_id for i in sent[1] for f in r.add(i, 0)] == [1]
    assert [f for i in sent[4] for f in r.add(i, 100)] == []        # 2 and 3 never came
    assert r.lost(100) == [(2, None), (3, None)]
    data = lambda k: [i for i in sent[k] if not mp.unpack_video(i).parity]  # noqa: E731
    assert [f.frame_id for i in data(2) for f in r.add(i, 104)] == [2]   # 3 still away
    assert [f.frame_id for i in data(3) for f in r.add(i, 105)] == [3, 4]
    assert r.recovered == 2 and r.incomplete == 0


def test_without_parity_the_last_data_fragment_settles_its_group():
    sent = frames(1, size=5000, parity=False)       # 5 data fragments, one group
    r = mp.Reassembler(hold_ms=100)
    r.add(sent[1][0], 0)
    r.add(sent[1][4], 0)                # the last of the group: 1..3 can't come any more
    assert r.lost(0) == [(1, [1, 2, 3])]


def test_a_frame_gone_quiet_has_lost_its_tail():
    sent = frames(1, size=5000, parity=False)
    r = mp.Reassembler(hold_ms=100, quiet_ms=10)
    r.add(sent[1][0], 0)
    assert r.lost(9) == []              # its other fragments may be on their way
    assert r.lost(10) == [(1, [1, 2, 3, 4])]


@SLOW
@given(seed=st.integers(0, 2 ** 32), loss=st.floats(0, 0.4), hold=st.sampled_from([0, 30, 100]),
       parity=st.booleans(), step_ms=st.sampled_from([0.5, 5.0, 40.0]))
def test_repair_never_breaks_the_rules(seed, loss, hold, parity, step_ms):
    """Random loss, Nacks answered (and lost) at random, time running: frames come out
    in order, never twice, intact; what is held stays within its caps."""
    rng = random.Random(seed)
    payloads = {i: rng.randbytes(rng.choice([0, 500, 4000, 12000])) for i in range(1, 40)}
    cache = mp.FragmentCache()
    resender = mp.Retransmitter(cache)
    r = mp.Reassembler(max_frames=6, max_bytes=60_000, hold_ms=hold)
    wire, delivered, now = [], [], 0.0
    for frame_id, payload in payloads.items():
        inners = mp.fragment(frame_id, payload, frame_id, frame_id % 9 == 1, mp.CODEC_VP8,
                             parity=parity)
        cache.add(frame_id, inners)
        wire += [i for i in inners if rng.random() >= loss]
        while wire:
            now += step_ms
            delivered += r.add(wire.pop(0), now)
            for nack in mp.Nack.asking(r.lost(now)):
                if rng.random() >= loss:
                    wire += [i for i in resender.answer(nack, now) if rng.random() >= loss]
            assert r.in_progress <= 6 and r.held_bytes <= 60_000 + 12_000
    delivered += r.poll(now + 1000)
    ids = [f.frame_id for f in delivered]
    assert ids == sorted(set(ids))
    assert all(f.data == payloads[f.frame_id] for f in delivered)
    assert r.completed >= len(delivered)


# --- the receiver: Nack first, keyframe after -------------------------------------------------

def test_receiver_asks_once_then_asks_for_a_keyframe():
    sent = frames(3)
    v = mp.VideoReceiver(wait_ms=50)
    out, controls = [], []
    for i in sent[1]:
        got = v.packet(i, 0)
        out += got[0]
        controls += got[1]
    assert [f.frame_id for f in out] == [1] and controls == []
    for i in (0, 4):                    # frame 2 loses 1..3 (parity can rebuild one)
        out, controls = v.packet(sent[2][i], 33)
    assert [mp.unpack_control(c) for c in controls] == mp.Nack.asking([(2, [1, 2])])
    for i in sent[3]:
        out, controls = v.packet(i, 66)
    assert out == [] and controls == []         # frame 3 waits for frame 2's repair
    out, controls = v.poll(33 + 49)
    assert out == [] and controls == []
    out, controls = v.poll(33 + 51)     # 2 given up: 3 is a delta after a gap
    assert out == [] and [mp.unpack_control(c) for c in controls] == [
        mp.Control(mp.CONTROL_KEYFRAME, 3)]
    assert v.nacks == 1 and v.gate.requests == 1


def test_receiver_without_repair_never_nacks():
    sent = frames(2)
    v = mp.VideoReceiver(repair=False)
    for i in sent[1]:
        v.packet(i, 0)
    v.packet(sent[2][0], 33)
    controls = [c for i in sent[2][3:] for c in v.packet(i, 34)[1]]
    assert all(mp.unpack_control(c).type == mp.CONTROL_KEYFRAME for c in controls)
    assert v.nacks == 0


# --- the sender: cache and Retransmitter ------------------------------------------------------

def test_cache_keeps_data_fragments_of_recent_frames_within_its_caps():
    cache = mp.FragmentCache(max_frames=3, max_bytes=20_000)
    sent = frames(5, size=5000)
    for frame_id, inners in sent.items():
        cache.add(frame_id, inners)
        assert cache.held_bytes <= 20_000
    assert [f in cache for f in range(1, 6)] == [False, False, True, True, True]
    assert cache.indices(5) == [0, 1, 2, 3, 4] and cache.get(5, 2) == sent[5][2]
    assert cache.get(5, 5) is None and cache.get(1, 0) is None   # 5 is parity; 1 is gone


def test_retransmitter_answers_each_fragment_once():
    cache = mp.FragmentCache()
    sent = frames(2, size=5000)
    for frame_id, inners in sent.items():
        cache.add(frame_id, inners)
    resender = mp.Retransmitter(cache)
    (nack,) = mp.Nack.asking([(1, [0, 3]), (2, None), (9, [1])])
    out = resender.answer(nack, 0)
    assert out == [sent[1][0], sent[1][3]] + [sent[2][i] for i in range(5)]
    assert resender.unknown == 1
    assert resender.answer(nack, 1000) == [] and resender.refused == 7
    assert (resender.resent, resender.unknown) == (7, 2)


def test_a_hostile_nack_storm_costs_at_most_the_budget():
    cache = mp.FragmentCache()
    big = mp.fragment(1, bytes(1_000_000), 0, True, mp.CODEC_VP8)      # 871 data fragments
    cache.add(1, big)
    resender = mp.Retransmitter(cache, per_s=100, burst=20)
    greedy = mp.unpack_control(mp.pack_control(mp.Nack(((1, mp.NACK_WHOLE_FRAME, 0),) * 16)))
    sent = []
    for t in range(0, 10_001, 10):      # 100 Nacks a second for 10 s
        sent += resender.answer(greedy, t)
    assert len(sent) <= 20 + 100 * 10
    assert len(set(sent)) == len(sent)  # never the same fragment twice
    assert resender.refused > 0


# --- the receiver's reports -------------------------------------------------------------------

def test_report_meter_measures_loss_and_queuing_delay():
    meter = mp.ReportMeter(0)
    seq = 0
    for k in range(40):                 # 250 ms intervals; the offset between clocks: 5000
        queue = 0 if k < 20 else 150
        for n in range(20):
            seq += 1
            if n % 10 != 4:             # one packet in ten lost
                meter.packet(seq, 1000, k * 250 + n)
                meter.transit(k * 250 + n, k * 250 + n + 5000 + 3 + queue + n % 3)
        report = meter.report(k * 250 + 250)
        assert 900 <= report.loss_bp <= 1100
        assert report.kbps == 576       # 18 x 1000 bytes in 250 ms
        assert report.delay_ms == (0 if k < 20 else 150) + 1
    assert meter.report(10_500) == mp.Report(0, 0, 0)       # nothing came


# --- the sender's rate ------------------------------------------------------------------------

def controller():
    return mp.RateController(1_000_000, 640, 480, 30)


BAD = mp.Report(2000, 0, 500)           # 20% lost, 500 kb/s arriving
CLEAR = mp.Report(0, 5, 900)


def test_rate_falls_by_bitrate_then_frame_rate_then_size():
    rate = controller()
    seen, t = [rate.update(0)], 0
    while seen[-1].bitrate > rate.min_bitrate:
        t += 250
        rate.report("bob", mp.Report(0, 300, 5000), t)     # queuing, plenty arriving
        seen.append(rate.update(t))
        assert t < 60_000
    assert seen[0] == mp.VideoSettings(1_000_000, 30, 640, 480)
    assert all(a.bitrate > b.bitrate for a, b in itertools.pairwise(seen))   # every report
    first_fps_drop = next(i for i, s in enumerate(seen) if s.fps < 30)
    first_size_drop = next(i for i, s in enumerate(seen) if s.width < 640)
    assert first_fps_drop >= 5                              # the bitrate fell first
    assert seen[first_fps_drop].width == 640                # then the frame rate
    assert first_size_drop > first_fps_drop + 1             # then the size
    assert seen[-1] == mp.VideoSettings(rate.min_bitrate, 10, 320, 240)
    assert rate.decreases == len(seen) - 1


def test_loss_cuts_straight_to_the_share_that_arrived():
    rate = controller()
    rate.report("bob", BAD, 0, sent_kbps=1400)      # 500 of our 1400 kb/s got there
    assert rate.update(0).bitrate <= 1_000_000 * 500 / 1400 * mp.RATE_DECREASE
    other = controller()
    other.report("bob", BAD, 0)                     # what we sent unknown: one step
    assert other.update(0).bitrate == round(1_000_000 * mp.RATE_DECREASE)


def test_one_congested_report_lowers_the_rate_once():
    rate = controller()
    rate.report("bob", BAD, 0)
    once = rate.update(0)
    for t in range(10, 1000, 10):       # no new report: no new decrease
        assert rate.update(t) == once


def test_rate_climbs_back_when_every_link_clears():
    rate = controller()
    for t in range(0, 5000, 250):
        rate.report("bob", BAD, t)
        rate.update(t)
    low = rate.settings
    t, sizes = 5000, []
    while rate.settings.bitrate < 1_000_000:
        rate.report("bob", CLEAR, t)
        sizes.append(rate.update(t).width)
        t += 100
        assert t < 120_000, rate.settings
    assert low.width == 320 and rate.settings == mp.VideoSettings(1_000_000, 30, 640, 480)
    assert sizes == sorted(sizes)       # never bouncing back down while clear
    assert rate.increases >= 10


def test_the_worst_link_decides_and_a_silent_one_counts_as_congested():
    rate = controller()
    for t in range(0, 3000, 100):
        rate.report("carol", CLEAR, t)
        rate.report("bob", mp.Report(500, 50, 1000), t)      # 5%: not clear, not congested
        assert rate.update(t).bitrate == 1_000_000
    for t in range(3000, 3000 + mp.REPORT_STALE_MS, 100):   # bob goes quiet
        rate.report("carol", CLEAR, t)
        assert rate.update(t).bitrate == 1_000_000
    rate.report("carol", CLEAR, 4600)
    assert rate.update(4600).bitrate < 1_000_000            # bob counts as congested now
    rate.forget("bob")
    before = rate.settings.bitrate
    for t in range(3100, 8000, 100):
        rate.report("carol", CLEAR, t)
        rate.update(t)
    assert rate.settings.bitrate > before


def test_no_reports_at_all_keep_the_full_rate():
    rate = controller()
    assert all(rate.update(t).bitrate == 1_000_000 for t in range(0, 10_000, 500))


def test_random_loss_that_is_no_congestion_holds_the_rate():
    rate = controller()
    rng = random.Random(5)
    for k in range(400):                # 100 s of 5% random loss, judged 4 times a second
        lost = sum(rng.random() < 0.05 for _ in range(37))
        rate.report("bob", mp.Report(round(10000 * lost / 37), 5, 1300), k * 250, 1300)
        assert rate.update(k * 250).bitrate == 1_000_000, (k, lost)


def test_delay_alone_is_congestion():
    rate = controller()
    rate.report("bob", mp.Report(0, 400, 900), 0)
    assert rate.update(0).bitrate < 1_000_000


def test_take_frame_keeps_the_frame_rate_from_a_faster_camera():
    rate = controller()
    for t in range(0, 20_000, 250):
        rate.report("bob", BAD, t)
        rate.update(t)
    assert rate.settings.fps == 10
    taken = sum(rate.take_frame(n * 1000 / 30) for n in range(300))     # 10 s of 30 fps
    assert 99 <= taken <= 101
    fast = controller()
    assert sum(fast.take_frame(n * 1000 / 30) for n in range(300)) == 300


# --- encoders take a new bitrate, frame rate and size -----------------------------------------

def test_vp8_encoder_reconfigures_with_a_keyframe_at_the_new_size():
    pattern = mp.TestPattern("enc")
    encoder = mp.make_video_encoder("vp8")
    decoder = mp.make_video_decoder("vp8")
    for n in range(5):
        data, _ = encoder.encode(pattern.frame(n), keyframe=n == 0)
        assert decoder.decode(data).shape == (480, 640, 3)
    assert encoder.configure(1_000_000, 15, 640, 480) is False      # frame rate alone
    assert encoder.configure(200_000, 15, 320, 240) is True
    data, key = encoder.encode(pattern.frame(5))
    assert key and decoder.decode(data).shape == (240, 320, 3)
    data, key = encoder.encode(pattern.frame(6))
    assert not key and decoder.decode(data).shape == (240, 320, 3)


def test_vp8_encoder_output_follows_the_bitrate():
    pattern = mp.TestPattern("enc")

    def kbps(bitrate):
        encoder = mp.make_video_encoder("vp8")
        encoder.configure(bitrate, 30, 640, 480)
        out = [encoder.encode(pattern.frame(n)) for n in range(90)]
        return sum(len(o[0]) for o in out if o) * 8 / 3 / 1000

    assert kbps(200_000) < 0.5 * kbps(1_000_000)


def test_jpeg_encoder_scales_and_follows_a_bitrate():
    pattern = mp.TestPattern("enc")
    encoder = mp.make_video_encoder("jpeg")
    full = len(encoder.encode(pattern.frame(0))[0])
    encoder.configure(400_000, 10, 320, 240)       # 5000 bytes a frame
    sizes = [len(encoder.encode(pattern.frame(n))[0]) for n in range(30)]
    assert mp.make_video_decoder("jpeg").decode(encoder.encode(pattern.frame(1))[0]).shape == (
        240, 320, 3)
    assert sum(sizes[-10:]) / 10 <= 5000 < full
    assert encoder.current < mp.JPEG_QUALITY


# --- the simulation bench/video_sim.py runs, on the real pure code ------------------------

def test_repair_keeps_more_frames_than_parity_alone_in_the_simulation():
    from bench import video_sim
    parity, both, nack = (video_sim.simulate(mode, 0.05, seed=3, seconds=20)
                          for mode in ("parity", "both", "nack"))
    assert both["shown_pct"] > parity["shown_pct"] and both["shown_pct"] > 97
    assert nack["kbps"] < both["kbps"]              # no parity: fewer bytes
    assert both["nacks"] > 0 and both["recovered"] > 0 and nack["recovered"] > 0


def test_a_short_burst_is_repaired_whole_in_the_simulation():
    from bench import video_sim
    cut = video_sim.simulate("both", 0.0, seconds=4, burst=(2000.0, 2200.0))
    plain = video_sim.simulate("parity", 0.0, seconds=4, burst=(2000.0, 2200.0))
    assert cut["shown_pct"] == 100 and cut["keyframes_asked"] == 0
    assert plain["shown_pct"] < 100 and plain["keyframes_asked"] >= 1
