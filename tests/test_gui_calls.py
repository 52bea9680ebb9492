"""Calls in the desktop window (chatroom.py, GUI CALLS and GUI APP), under an
Xvfb these tests start, beside a host and terminal clients on 127.0.0.1.

The window runs with `--camera test --audio null` (no camera or sound card
here); the terminal clients too. The window is driven like a person does
(clicks, keys, closing a window) and followed through its trace: the call
window says where its tiles are, and each time it puts a new frame on
screen (after an XSync), so pixels are read after that, never after a
sleep. Video must move: two shots of a peer's tile differ, and a tile is
not one flat colour.
"""

from __future__ import annotations

import signal
import time

import pytest
from test_gui import assert_exits_cleanly, unique

from guidriver import LOOPBACK, Cli, Gui, Host, Xvfb, on_screen

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


def window_in_room(x, tmp_path, procs, host: Host, user: str = "alice") -> Gui:
    gui = Gui(x, tmp_path / "config", ["--downloads", str(tmp_path / "dl"), "--server",
                                       f"{LOOPBACK}:{host.port}", "--room", "r", "--user",
                                       user, *MEDIA])
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
    x.click(box[0] + box[2] / 2, box[1] + box[3] / 2)


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
    # ESC with bob's tile picked: that link only ends; the window closes with the last.
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


def test_a_four_person_grid_backspace_ends_all_and_closing_the_window_hangs_up(
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
    # Backspace with our own tile picked ends every call.
    click_tile(gui, x, layout, "alice")
    x.key("BackSpace")
    for other in (bob, carol, dave):
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
