"""Calls in the desktop window (chatroom.py, GUI CALLS and GUI APP), under an
Xvfb these tests start, beside a host and terminal clients on 127.0.0.1.

The window runs with `--camera test --audio null` (no camera or sound card
here); the terminal clients too. The window is driven like a person does
(clicks, keys, closing a window) and followed through its trace: the call
window says where its tiles are, and each time it puts a new frame on
screen (after an XSync), so pixels are read after that, never after a
sleep. Video must move: two shots of a peer's tile differ, and a tile is
not one flat colour. A tile lights up while its person speaks (a tone, a
WAV file); the headphones hint is tested on a PulseAudio null sink
(tests/pulse.py), the only stand-in for a real microphone here.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from pulse import pulse_server
from test_gui import assert_exits_cleanly, unique

from conftest import free_udp_port
from guidriver import LOOPBACK, Cli, Gui, Host, Xvfb, in_tk_child, ink, on_screen

MEDIA = ["--camera", "test", "--audio", "null"]


@pytest.fixture(scope="module")
def x():
    display = Xvfb(1280, 800).start()
    yield display
    display.stop()


@pytest.fixture
def procs():
    started: list = []
    yield started
    for proc in started:
        proc.stop()


def caller(host: Host, user: str, procs: list) -> Cli:
    """A terminal client with the test camera, in room "r"."""
    cli = Cli(host.port, "r", user, extra=MEDIA)
    assert cli.ready["type"] == "ready", cli.ready
    procs.append(cli)
    return cli


def window_in_room(x, tmp_path, procs, host: Host, user: str = "alice",
                   extra: tuple[str, ...] = ()) -> Gui:
    gui = Gui(x, tmp_path / "config", ["--downloads", str(tmp_path / "dl"), "--server",
                                       f"{LOOPBACK}:{host.port}", "--room", "r", "--user",
                                       user, *MEDIA, *extra])
    procs.append(gui)
    gui.window("launcher")
    gui.click("launcher", "join")
    gui.phase("chatting")
    return gui


def answer_from_the_card(gui: Gui, x, user: str, start: int = 0) -> None:
    """`user` is calling: click Call back on its card in the chat (a card
    drawn after line `start` of the trace)."""
    card = gui.wait_for(lambda e: e.get("gui") == "call_card" and e["user"] == user
                        and e["state"] == "ringing", 15, start)  # the countdown redraws it
    gui.painted(card)
    box = on_screen(card, card["links"]["callback"])
    mark = gui.mark()
    x.click(box[0] + box[2] / 2, box[1] + box[3] / 2)
    answered = gui.wait_for(lambda e: e.get("gui") == "call_card" and e["user"] == user
                            and e["state"] == "answered", 15, mark)
    assert answered["title"] == f"{user} called you"        # no longer "is calling you"


def answer_from_the_bar(gui: Gui, x, other: Cli) -> None:
    """While the window is in a call, `other` calls it: click Call back on
    the bar the call window shows."""
    mark = gui.mark()
    other.say("/CHECK " + gui.argv[gui.argv.index("--user") + 1])
    bar = gui.wait_for(lambda e: e.get("gui") == "call_ringing" and e["user"] == other.user,
                       15, mark)
    bx, by, bw, bh = bar["elements"]["answer"]
    x.click(bx + bw / 2, by + bh / 2)


def call_window(gui: Gui, names: set[str], start: int = 0) -> dict:
    """The call window's latest layout once it has tiles for `names`."""
    gui.wait_for(lambda e: e.get("gui") == "window" and e["name"] == "call"
                 and {t["name"] for t in e["tiles"]} == names, 20, start)
    return [e for e in gui.lines if e.get("gui") == "window" and e["name"] == "call"][-1]


def tile_of(layout: dict, name: str) -> tuple[int, int, int, int]:
    return tuple(next(t["box"] for t in layout["tiles"] if t["name"] == name))


def frames_after(gui: Gui, name: str, count: int, start: int) -> dict:
    """Wait until `count` new frames of `name` have been put on screen."""
    seen = []
    return gui.wait_for(lambda e: e.get("gui") == "tile_frame" and e["name"] == name
                        and not e["mine"] and (seen.append(e) or len(seen) >= count), 30, start)


def click_tile(gui: Gui, x, layout: dict, name: str) -> None:
    bx, by, bw, bh = tile_of(layout, name)
    mark = gui.mark()
    x.click(bx + bw / 2, by + bh / 2)
    gui.wait_for(lambda e: e.get("gui") == "call_selected" and e["name"] == name, 10, mark)


MEDIA_LOOPS = ("_video_loop", "_decode_loop", "_audio_loop")   # the call engine's threads


def media_threads(gui: Gui) -> set[str]:
    """The call engine's threads alive in the window process, read from the
    stack dump it writes on SIGUSR1 (faulthandler, all threads; the main
    thread's ends the dump with `<module>`)."""
    start = len(gui.stderr)
    gui.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while not any(line.rstrip().endswith("in <module>") for line in gui.stderr[start:]):
        assert time.monotonic() < deadline, "the window wrote no stack dump"
        time.sleep(0.05)
    dump = "".join(gui.stderr[start:])
    return {loop for loop in MEDIA_LOOPS if f" in {loop}" in dump}


def wait_no_media_threads(gui: Gui, timeout: float = 15) -> None:
    """After a call: its threads end (they poll 4 times a second)."""
    deadline = time.monotonic() + timeout
    while (left := media_threads(gui)):
        assert time.monotonic() < deadline, f"threads left behind after the call: {left}"
        time.sleep(0.2)


def test_video_moves_in_the_call_window_and_esc_hangs_up_on_that_peer(x, tmp_path, procs):
    host = Host(unique("call"), advertise=False)
    procs.append(host)
    gui = window_in_room(x, tmp_path, procs, host)
    bob = caller(host, "bob", procs)
    bob.say("/CHECK alice")
    gui.shown(lambda e: e["kind"] == "notice" and e["style"] == "system"
              and e["text"].startswith("[SYSTEM] <bob> CALL YOU"))
    answer_from_the_card(gui, x, "bob")
    bob.wait_for(lambda e: e.get("type") == "call_connected" and e["peer"] == "alice", 20)
    layout = call_window(gui, {"alice", "bob"})
    mark = gui.mark()
    frames_after(gui, "bob", 3, mark)
    first = x.pixels(tile_of(layout, "bob"))
    frames_after(gui, "bob", 10, gui.mark())
    second = x.pixels(tile_of(layout, "bob"))
    assert first[2] != second[2], "bob's tile shows the same picture: the video is frozen"
    assert len(set(second[2][i:i + 3] for i in range(0, len(second[2]), 3 * 97))) > 20, \
        "bob's tile is one flat colour: no video"
    # ESC with our own tile picked hangs up on nobody (Backspace is that
    # tile's key): a hint. A line typed after it reaches bob first, before
    # any hang-up (one connection to the host, in order).
    click_tile(gui, x, layout, "alice")
    mark = gui.mark()
    x.key("Escape")
    said = gui.wait_for(lambda e: e.get("gui") == "call_status" and "own tile" in e["text"],
                        10, mark)
    assert "Backspace" in said["text"]
    gui.type_into("chat", "input", "still in the call", enter=True)
    bob.wait_for(lambda e: e.get("type") == "message" and e["text"] == "still in the call")
    assert not [e for e in bob.lines if e.get("type") == "call_ended"]
    # ESC with bob's tile picked: that link only ends; the window closes with the last.
    layout = call_window(gui, {"alice", "bob"})
    click_tile(gui, x, layout, "bob")
    x.key("Escape")
    ended = bob.wait_for(lambda e: e.get("type") == "call_ended", 15)
    assert (ended["peer"], ended["reason"]) == ("alice", "hangup")
    gui.wait_for(lambda e: e.get("gui") == "call_window_closed", 15)
    # The chat goes on.
    gui.type_into("chat", "input", "still chatting", enter=True)
    bob.wait_for(lambda e: e.get("type") == "message" and e["text"] == "still chatting")
    # Closing the call window and at once the chat: both are done (an event
    # that comes while a window closes is not lost).
    mark = gui.mark()
    bob.say("/CHECK alice")
    answer_from_the_card(gui, x, "bob", mark)
    call_window(gui, {"alice", "bob"}, mark)
    gui.close("call")
    gui.close("chat")
    assert_exits_cleanly(gui)


def test_a_four_person_grid_esc_ends_one_backspace_all_closing_the_window_hangs_up(
        x, tmp_path, procs):
    host = Host(unique("grid"), advertise=False)
    procs.append(host)
    gui = window_in_room(x, tmp_path, procs, host)
    bob, carol, dave = (caller(host, name, procs) for name in ("bob", "carol", "dave"))
    bob.say("/CHECK alice")
    answer_from_the_card(gui, x, "bob")
    call_window(gui, {"alice", "bob"})
    for other in (carol, dave):         # each joins the call in progress through alice,
        answer_from_the_bar(gui, x, other)  # answered from the bar in the call window
    layout = call_window(gui, {"alice", "bob", "carol", "dave"})
    boxes = {name: tile_of(layout, name) for name in ("alice", "bob", "carol", "dave")}
    assert len({box[1] for box in boxes.values()}) == 2, f"not a 2 x 2 grid: {boxes}"
    assert len({box[0] for box in boxes.values()}) == 2, f"not a 2 x 2 grid: {boxes}"
    for name in ("bob", "carol", "dave"):   # everyone's video arrives
        frames_after(gui, name, 2, 0)
    assert gui.wait_for(lambda e: e.get("gui") == "call_status", 5)  # said who is in it
    said = [e["text"] for e in gui.lines if e.get("gui") == "call_status"][-1]
    assert said.startswith("In a call with ") and all(n in said for n in ("bob", "carol", "dave"))
    # ESC with bob's tile picked hangs up on bob alone: three tiles stay, and
    # carol and dave, told nothing, get a line typed after it (a hang-up on
    # them would have come first: one connection to the host, in order).
    click_tile(gui, x, layout, "bob")
    mark = gui.mark()
    x.key("Escape")
    assert bob.wait_for(lambda e: e.get("type") == "call_ended" and e["peer"] == "alice",
                        15)["reason"] == "hangup"
    layout = call_window(gui, {"alice", "carol", "dave"}, mark)
    gui.wait_for(lambda e: e.get("gui") == "call_status"
                 and e["text"].endswith("In a call with carol and dave."), 10, mark)
    gui.type_into("chat", "input", "bob has gone", enter=True)
    for other in (carol, dave):
        other.wait_for(lambda e: e.get("type") == "message" and e["text"] == "bob has gone")
        assert not [e for e in other.lines if e.get("type") == "call_ended"
                    and e["peer"] == "alice"], f"{other.user} was hung up on too"
    # Backspace with our own tile picked ends every call.
    layout = call_window(gui, {"alice", "carol", "dave"}, mark)
    click_tile(gui, x, layout, "alice")
    x.key("BackSpace")
    for other in (carol, dave):
        assert other.wait_for(lambda e: e.get("type") == "call_ended"
                              and e["peer"] == "alice", 15)["reason"] == "hangup"
    gui.wait_for(lambda e: e.get("gui") == "call_window_closed", 15)
    # A new call, then the call window's close button: a hang-up, the chat stays.
    mark = gui.mark()
    bob.say("/CHECK alice")
    answer_from_the_card(gui, x, "bob", mark)
    call_window(gui, {"alice", "bob"}, mark)
    assert media_threads(gui) == set(MEDIA_LOOPS)
    gui.close("call")
    bob.wait_for(lambda e: e.get("type") == "call_ended" and e["peer"] == "alice", 15)
    wait_no_media_threads(gui)              # no thread behind, camera and sound closed
    gui.type_into("chat", "input", "after the call", enter=True)
    bob.wait_for(lambda e: e.get("type") == "message" and e["text"] == "after the call")
    gui.close("chat")
    assert_exits_cleanly(gui)


def test_video_call_calls_the_member_picked_and_a_relayed_peer_is_said(x, tmp_path, procs):
    """Pick bob in the members list, press Video call: bob (only) is
    invited. His client sends its media through the host (--media-path
    relay): the call window says so in its status line."""
    host = Host(unique("pick"), advertise=False)
    procs.append(host)
    gui = window_in_room(x, tmp_path, procs, host)
    bob = Cli(host.port, "r", "bob", extra=[*MEDIA, "--media-path", "relay"])
    procs.append(bob)
    carol = caller(host, "carol", procs)
    members = gui.wait_for(lambda e: e.get("gui") == "members" and len(e["members"]) == 3, 15)
    row = next(r for r in members["rows"] if r["user"] == "bob")["box"]
    x.click(row[0] + row[2] / 2, row[1] + row[3] / 2)
    gui.wait_for(lambda e: e.get("gui") == "picked" and e["user"] == "bob")
    gui.click("chat", "video")
    assert bob.wait_for(lambda e: e.get("type") == "call_invite", 15)["from"] == "alice"
    # Back to everyone (bob's private conversation moved the list down):
    # a line to all, typed after the invitation, reaches carol after it would.
    members = [e for e in gui.lines if e.get("gui") == "members"][-1]
    row = next(r for r in members["rows"] if r["user"] is None)["box"]    # "Everyone"
    mark = gui.mark()
    x.click(row[0] + row[2] / 2, row[1] + row[3] / 2)
    gui.wait_for(lambda e: e.get("gui") == "picked" and e["user"] is None, 10, mark)
    gui.type_into("chat", "input", "only bob", enter=True)
    carol.wait_for(lambda e: e.get("type") == "message" and e["text"] == "only bob")
    assert not [e for e in carol.lines if e.get("type") == "call_invite"]
    bob.say("/CHECK alice")
    call_window(gui, {"alice", "bob"})
    said = gui.wait_for(lambda e: e.get("gui") == "call_status" and "host" in e["text"], 30)
    assert said["text"] == "bob's video and sound go through the host, not straight over UDP."
    frames_after(gui, "bob", 3, 0)          # and they do come
    gui.close("call")
    bob.wait_for(lambda e: e.get("type") == "call_ended" and e["peer"] == "alice", 15)
    gui.close("chat")
    assert_exits_cleanly(gui)


def test_a_direct_call_from_the_video_call_button_shows_the_safety_code(x, tmp_path, procs):
    """"127.0.0.1 P1 P2" and Video call in the window, "/call 127.0.0.1 P2
    P1" in a terminal: they connect, and the peer's tile shows the safety
    code the terminal shows."""
    host = Host(unique("direct"), advertise=False)
    procs.append(host)
    gui = window_in_room(x, tmp_path, procs, host)
    bob = caller(host, "bob", procs)
    mine, theirs = free_udp_port(), free_udp_port()
    gui.type_into("chat", "input", f"127.0.0.1 {mine} {theirs}")
    gui.click("chat", "video")
    gui.shown(lambda e: e["kind"] == "echo"
              and e["text"] == f"Video call 127.0.0.1 {mine} {theirs}", 10)
    bob.say(f"/call 127.0.0.1 {theirs} {mine}")
    code = bob.wait_for(lambda e: e.get("type") == "call_connected", 30)["safety_code"]
    assert code
    layout = gui.wait_for(lambda e: e.get("gui") == "window" and e["name"] == "call"
                          and any(t["detail"] for t in e["tiles"] if not t["mine"]), 30)
    assert [t["detail"] for t in layout["tiles"] if not t["mine"]] == [code]
    gui.close("call")
    bob.wait_for(lambda e: e.get("type") == "call_ended", 20)
    wait_no_media_threads(gui)
    gui.close("chat")
    assert_exits_cleanly(gui)


def call_window_is_closed(gui: Gui) -> bool:
    """Was the call window's last word that it closed (or did it never open)?"""
    said = [e for e in gui.lines if e.get("gui") == "call_window_closed"
            or (e.get("gui") == "window" and e["name"] == "call")]
    return not said or said[-1]["gui"] == "call_window_closed"


@pytest.mark.parametrize("moment", ["as_it_opens", "after_call_back_on_the_bar"])
def test_closing_the_call_window_at_once_hangs_up_and_leaves_no_media_thread(
        moment, x, tmp_path, procs):
    """The call window's close button, pressed the moment the window is up
    (bob, stopped, hasn't even heard that the call connected), or right
    after Call back on the bar while carol's link is still being made:
    every call ends, no media thread stays behind, the chat goes on."""
    host = Host(unique("close"), advertise=False)
    procs.append(host)
    gui = window_in_room(x, tmp_path, procs, host)
    bob = caller(host, "bob", procs)
    bob.say("/CHECK alice")
    if moment == "as_it_opens":
        gui.wait_for(lambda e: e.get("gui") == "call_card" and e["user"] == "bob"
                     and e["state"] == "ringing", 15)
        bob.proc.send_signal(signal.SIGSTOP)    # ours, by PID: he reads nothing now
        try:
            answer_from_the_card(gui, x, "bob")
            gui.window("call", 20)
            gui.close("call")
            gui.wait_for(lambda e: e.get("gui") == "call_window_closed", 15)
            assert not [e for e in bob.lines if e.get("type") == "call_connected"]
        finally:
            bob.proc.send_signal(signal.SIGCONT)
        connected = bob.wait_for(lambda e: e.get("type") == "call_connected"
                                 and e["peer"] == "alice", 15)
        bob.wait_for(lambda e: e.get("type") == "call_ended" and e["peer"] == "alice", 15,
                     bob.lines.index(connected))
    else:
        carol = caller(host, "carol", procs)
        answer_from_the_card(gui, x, "bob")
        call_window(gui, {"alice", "bob"})
        mark = gui.mark()
        carol.say("/CHECK alice")
        bar = gui.wait_for(lambda e: e.get("gui") == "call_ringing" and e["user"] == "carol",
                           15, mark)
        host.proc.send_signal(signal.SIGSTOP)   # ours, by PID: the call back waits in it
        try:
            bx, by, bw, bh = bar["elements"]["answer"]
            x.click(bx + bw / 2, by + bh / 2)
            gui.wait_for(lambda e: e.get("gui") == "call_ringing" and e["user"] is None,
                         10, mark)              # Call back was pressed: the bar went
            gui.close("call")
            gui.wait_for(lambda e: e.get("gui") == "call_window_closed", 15, mark)
        finally:
            host.proc.send_signal(signal.SIGCONT)
        for other in (bob, carol):
            other.wait_for(lambda e: e.get("type") == "call_ended" and e["peer"] == "alice", 20)
        # The host links carol (the call back came first), then ends her
        # link with everyone else's (the hang-up); the call window comes
        # back with her tile for that moment.
        gui.wait_for(lambda e: e.get("gui") == "event" and e["event"]["type"] == "call_ended"
                     and e["event"]["peer"] == "carol", 20, mark)
    # A line typed now is handled after every event above: then the call
    # window must be closed, and every media thread gone.
    gui.type_into("chat", "input", "no call now", enter=True)
    bob.wait_for(lambda e: e.get("type") == "message" and e["text"] == "no call now")
    assert call_window_is_closed(gui)
    wait_no_media_threads(gui)
    assert not [e for e in bob.lines if e.get("type") == "call_ended"
                and e["peer"] == "alice" and e["reason"] != "hangup"]
    gui.close("chat")
    assert_exits_cleanly(gui)


def test_a_missed_call_card_says_they_called(x, tmp_path, procs):
    """An invitation nobody answered (the host's --call-timeout, short
    here) ends the ringing card: no Call back any more, and it says in the
    past tense who called."""
    host = Host(unique("missed"), advertise=False, extra=["--call-timeout", "2"])
    procs.append(host)
    gui = window_in_room(x, tmp_path, procs, host)
    bob = caller(host, "bob", procs)
    bob.say("/CHECK alice")
    ringing = gui.wait_for(lambda e: e.get("gui") == "call_card" and e["user"] == "bob"
                           and e["state"] == "ringing", 15)
    assert ringing["title"] == "bob is calling you"
    missed = gui.wait_for(lambda e: e.get("gui") == "call_card" and e["user"] == "bob"
                          and e["state"] == "missed", 20)
    assert missed["title"] == "bob called you"
    assert missed["status"].startswith("Missed call") and "callback" not in missed["links"]
    bob.wait_for(lambda e: e.get("type") == "call_failed" and e["peer"] == "alice", 10)
    gui.close("chat")
    assert_exits_cleanly(gui)


_SEND = "def main(root, interp, script):\n    root.tk.call('send', interp, script)\n"


def shrink_to_minimum(gui: Gui, x: Xvfb, layout: dict) -> dict:
    """Ask the call window's Tk for a 1 x 1 window (Tk's send, as
    guidriver.drop_files does): Tk keeps it at its minimum size (wm
    minsize). The layout traced at that size."""
    mark = gui.mark()
    in_tk_child(x, _SEND, layout["interp"], f"wm geometry {layout['path']} 1x1")
    return gui.wait_for(lambda e: e.get("gui") == "window" and e["name"] == "call"
                        and e["box"][2:] == e["min"], 20, mark)


def inside(box: list[int], window: list[int]) -> bool:
    x, y, w, h = box
    wx, wy, ww, wh = window
    return w > 0 and h > 0 and wx <= x and x + w <= wx + ww and wy <= y and y + h <= wy + wh


@pytest.mark.parametrize("scale", ["1", "1.5"])
def test_at_its_minimum_size_the_call_window_keeps_its_status_line_and_buttons(
        scale, x, tmp_path, procs):
    """The tiles give way, never the lines under them: every button whole
    and inside the window, the status line too; and the bar that rings
    when someone else calls fits as well."""
    host = Host(unique("small"), advertise=False)
    procs.append(host)
    gui = window_in_room(x, tmp_path, procs, host, extra=("--scale", scale))
    bob, carol = caller(host, "bob", procs), caller(host, "carol", procs)
    bob.say("/CHECK alice")
    answer_from_the_card(gui, x, "bob")
    roomy = call_window(gui, {"alice", "bob"})
    gui.wait_for(lambda e: e.get("gui") == "call_status", 10)
    small = shrink_to_minimum(gui, x, roomy)
    assert small["box"][3] < roomy["box"][3], (small["box"], roomy["box"])
    buttons = ("mute", "camera", "hangup", "end")
    for name in (*buttons, "status"):
        assert inside(small["elements"][name], small["box"]), \
            f"{name} is cut off at the minimum size: {small['elements'][name]} in {small['box']}"
    for name in buttons:                    # whole: as large as in the roomy window
        assert small["elements"][name][2:] == roomy["elements"][name][2:], name
    x.screenshot(tmp_path / f"call-minimum-{scale}.png", small["xid"])
    # Carol calls: the bar with Call back and Decline takes room from the tiles too.
    mark = gui.mark()
    carol.say("/CHECK alice")
    bar = gui.wait_for(lambda e: e.get("gui") == "call_ringing" and e["user"] == "carol",
                       15, mark)
    squeezed = gui.wait_for(lambda e: e.get("gui") == "window" and e["name"] == "call"
                            and e["elements"]["tiles"][3] < small["elements"]["tiles"][3],
                            15, mark)
    assert squeezed["box"] == small["box"]
    for name, box in (*bar["elements"].items(),
                      *((n, squeezed["elements"][n]) for n in (*buttons, "status"))):
        assert inside(box, squeezed["box"]), f"{name} is cut off with the bar up: {box}"
    x.screenshot(tmp_path / f"call-minimum-ringing-{scale}.png", squeezed["xid"])
    gui.close("call")
    bob.wait_for(lambda e: e.get("type") == "call_ended" and e["peer"] == "alice", 15)
    gui.close("chat")
    assert_exits_cleanly(gui)


def test_a_camera_that_will_not_open_is_a_line_in_the_call_window(x, tmp_path, procs):
    host = Host(unique("nocam"), advertise=False)
    procs.append(host)
    gui = Gui(x, tmp_path / "config", ["--downloads", str(tmp_path / "dl"), "--server",
                                       f"{LOOPBACK}:{host.port}", "--room", "r", "--user",
                                       "alice", "--camera", str(tmp_path / "no-such-camera.mp4"),
                                       "--audio", "null"])
    procs.append(gui)
    gui.window("launcher")
    gui.click("launcher", "join")
    gui.phase("chatting")
    bob = caller(host, "bob", procs)
    bob.say("/CHECK alice")
    answer_from_the_card(gui, x, "bob")
    said = gui.wait_for(lambda e: e.get("gui") == "call_status" and "no-such-camera" in e["text"],
                        20)
    assert said["text"].startswith("In a call with bob."), said
    gui.wait_for(lambda e: e.get("gui") == "event" and e["event"]["type"] == "media_state"
                 and e["event"]["video"] is False, 10)  # the button offers "Camera on"
    frames_after(gui, "bob", 3, 0)          # bob's video still comes: the call goes on
    gui.close("call")
    bob.wait_for(lambda e: e.get("type") == "call_ended" and e["peer"] == "alice", 15)
    gui.type_into("chat", "input", "no camera here", enter=True)
    bob.wait_for(lambda e: e.get("type") == "message" and e["text"] == "no camera here")
    gui.close("chat")
    assert_exits_cleanly(gui)


# --- Voice: who speaks, and headphones without an echo canceller -------------------

SPEECH = Path(__file__).resolve().parent / "data" / "speech-alice.wav"
SPEAKING_RGB = (0x3D, 0xDC, 0x84)       # chatroom.SPEAKING_COLOUR


def speaking(gui: Gui, name: str, state: bool, start: int = 0, timeout: float = 20) -> dict:
    """Wait until `name`'s tile is said lit (state True) or dark, on screen."""
    return gui.wait_for(lambda e: e.get("gui") == "tile_speaking" and e["name"] == name
                        and e["speaking"] is state, timeout, start)


def ring_pixels(x: Xvfb, box: tuple[int, int, int, int]) -> int:
    """How many pixels of the speaking ring's colour lie along the bottom of a
    tile (the middle half of its width; the ring runs a few pixels inside)."""
    bx, by, bw, bh = box
    _w, _h, pixels = x.pixels((bx + bw // 4, by + bh - 14, bw // 2, 14))
    return sum(1 for i in range(0, len(pixels), 3)
               if all(abs(pixels[i + c] - SPEAKING_RGB[c]) <= 24 for c in range(3)))


def test_a_tile_lights_up_while_its_person_speaks(x, tmp_path, procs):
    host = Host(unique("speak"), advertise=False)
    procs.append(host)
    gui = Gui(x, tmp_path / "config", ["--downloads", str(tmp_path / "dl"), "--server",
                                       f"{LOOPBACK}:{host.port}", "--room", "r", "--user",
                                       "alice", "--camera", "test", "--audio", str(SPEECH)])
    procs.append(gui)
    gui.window("launcher")
    gui.click("launcher", "join")
    gui.phase("chatting")
    bob = Cli(host.port, "r", "bob", extra=["--camera", "test", "--audio", "tone"])
    procs.append(bob)
    bob.say("/CHECK alice")
    answer_from_the_card(gui, x, "bob")
    layout = call_window(gui, {"alice", "bob"})
    box = tile_of(layout, "bob")
    speaking(gui, "bob", True)              # bob's tone plays here: his tile lights up
    assert ring_pixels(x, box) >= box[2] // 2, "bob speaks, but his tile shows no ring"
    speaking(gui, "alice", True)            # alice's own voice (the WAV file) as sent
    # Stand-ins (a tone, a WAV file) play into no room: no headphones hint.
    assert not [e for e in gui.lines if e.get("gui") == "call_hint" and e["shown"]]
    x.screenshot(tmp_path / "call-speaking.png", layout["xid"])
    mark = gui.mark()
    bob.say("/mute")                        # he goes quiet: his tile goes dark
    speaking(gui, "bob", False, mark)
    assert ring_pixels(x, box) < box[2] // 8, "bob is muted, but his tile still shows a ring"
    mark = gui.mark()
    bob.say("/unmute")
    speaking(gui, "bob", True, mark)
    gui.close("call")
    bob.wait_for(lambda e: e.get("type") == "call_ended" and e["peer"] == "alice", 15)
    gui.close("chat")
    assert_exits_cleanly(gui)


BROKEN_LIVEKIT = "raise ImportError('livekit is broken here: a test stands in for it')\n"


@pytest.mark.parametrize("case", ["no-echo-cancel", "broken-livekit", "cancelling"])
def test_the_call_window_suggests_headphones_only_without_an_echo_canceller(
        case, x, tmp_path, procs):
    """A laptop on a table (PulseAudio: a null sink, its monitor as the
    microphone): with --no-echo-cancel, or a livekit that won't load, a line
    under the tiles suggests headphones; with the echo canceller running,
    there is none, while the person's own voice still lights their tile."""
    host = Host(unique("hint"), advertise=False)
    procs.append(host)
    with pulse_server(tmp_path, ("laptop",)) as sound:
        env = {name: value for name, value in sound.items() if name != "XDG_CONFIG_HOME"}
        env.update(PULSE_SINK="laptop", PULSE_SOURCE="laptop.monitor")
        flags = ["--camera", "test", "--audio", "default"]
        if case == "no-echo-cancel":
            flags.append("--no-echo-cancel")
        if case == "broken-livekit":        # found, but it won't load
            (tmp_path / "shim" / "livekit").mkdir(parents=True)
            (tmp_path / "shim" / "livekit" / "__init__.py").write_text(BROKEN_LIVEKIT)
            env["PYTHONPATH"] = str(tmp_path / "shim")
        gui = Gui(x, tmp_path / "config", ["--downloads", str(tmp_path / "dl"), "--server",
                                           f"{LOOPBACK}:{host.port}", "--room", "r", "--user",
                                           "alice", *flags], env=env)
        procs.append(gui)
        gui.window("launcher")
        gui.click("launcher", "join")
        gui.phase("chatting")
        bob = caller(host, "bob", procs)
        bob.say("/CHECK alice")
        answer_from_the_card(gui, x, "bob")
        call_window(gui, {"alice", "bob"})
        if case != "cancelling":
            hint = gui.wait_for(lambda e: e.get("gui") == "call_hint" and e["shown"], 20)
            assert "Headphones" in hint["text"]
            assert ink(x.pixels(tuple(hint["box"]))[2]) > 20, "the hint is not on screen"
            if case == "broken-livekit":    # and the log says why
                assert any("no echo cancelling" in line and "livekit" in line
                           for line in gui.stderr), gui.stderr[-5:]
        else:
            # Alice speaks into her laptop: her tile lights once the sound is
            # open and the canceller runs (her voice gets through it).
            voice = subprocess.Popen(["paplay", "-d", "laptop", str(SPEECH)],
                                     env={**x.env(), **sound}, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
            try:
                speaking(gui, "alice", True, timeout=30)
            finally:
                voice.communicate(timeout=30)
            assert not [e for e in gui.lines if e.get("gui") == "call_hint" and e["shown"]]
            assert not [line for line in gui.stderr if "no echo cancelling" in line]
        gui.close("call")
        bob.wait_for(lambda e: e.get("type") == "call_ended" and e["peer"] == "alice", 15)
        gui.close("chat")
        assert_exits_cleanly(gui)
