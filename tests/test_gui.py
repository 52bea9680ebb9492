"""Tests of the desktop window (chatroom.py, the GUI sections).

The first tests call the GUI sections' pure helpers (fonts, avatars, settings, the
bridge) with no display. The rest run the real program, `chatroom.py` with no
mode, on an Xvfb display these tests start themselves, beside a host and a
terminal client (`--cli --json`) on 127.0.0.1. They drive the window as a
person does (xdotool clicks and typing, WM_DELETE_WINDOW to close) and follow
what it does through its trace hook (CHATROOM_GUI_TRACE=1: JSON lines on
stdout), see tests/guidriver.py. Pixels are checked once: Chinese must not
render as the boxes a font draws for a missing glyph.

Nothing here is skipped: a missing Xvfb, xdotool or ImageMagick fails.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import chatroom
from conftest import free_udp_port
from guidriver import (
    LOOPBACK,
    Cli,
    Gui,
    Host,
    Proc,
    Xvfb,
    in_tk_child,
    ink,
    on_screen,
    shrink_to_minimum,
)

RUN = f"guitest-{os.getpid()}"            # unique host names: the machine is shared
_names = itertools.count(1)


# --- helpers and fixtures ------------------------------------------------------

@pytest.fixture(scope="session")
def x():
    """One Xvfb for the session, on a free display number, stopped at the end."""
    for tool, package in (("Xvfb", "xvfb"), ("xdotool", "xdotool"),
                          ("import", "imagemagick")):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: apt-get install {package} (see README.md)")
    display = Xvfb(1280, 800).start()
    yield display
    display.stop()


@pytest.fixture
def procs():
    """Processes a test starts; whatever still runs at the end is stopped."""
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop()


def unique(stem: str) -> str:
    return f"{RUN}-{stem}{next(_names)}"


def start_gui(x, tmp_path: Path, procs: list, *args: str, env: dict | None = None) -> Gui:
    gui = Gui(x, tmp_path / "config", ["--downloads", str(tmp_path / "gui-downloads"),
                                       *args], env=env)
    procs.append(gui)
    gui.window("launcher")
    return gui


def join_from_launcher(gui: Gui, x) -> dict:
    """Click Join (the fields were filled by flags) and wait for the room."""
    gui.click("launcher", "join")
    gui.phase("chatting")
    return gui.window("chat")


def opener_stub(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A stand-in for xdg-open, first on PATH: it writes down what it was
    asked to open. (the file it writes to, the environment for the window)"""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    opened = tmp_path / "opened.txt"
    (bin_dir / "xdg-open").write_text(f"#!/bin/sh\necho \"$1\" >> {opened}\n")
    (bin_dir / "xdg-open").chmod(0o755)
    return opened, {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def window_and_cli(x, tmp_path: Path, procs: list, stem: str, user: str = "bob",
                   host_extra: list[str] = ()) -> tuple[Host, Gui, Cli]:
    """A host of our own, the window joined to its room "r" as alice, and
    `user` there too through --cli."""
    host = Host(unique(stem), advertise=False, extra=list(host_extra))
    procs.append(host)
    gui = start_gui(x, tmp_path, procs, "--server", f"{LOOPBACK}:{host.port}", "--room", "r",
                    "--user", "alice")
    join_from_launcher(gui, x)
    cli = Cli(host.port, "r", user)
    procs.append(cli)
    return host, gui, cli


def assert_exits_cleanly(gui: Gui) -> float:
    """The window process ends by itself, status 0, leaving no child behind;
    returns how long it took (printed: the README reports it; a deadline
    here would only measure how busy the shared machine is)."""
    started = time.monotonic()
    try:
        status = gui.wait_exit(EXIT_DEADLINE_S)     # a hang detector, not a speed test
    except subprocess.TimeoutExpired:
        gui.proc.send_signal(signal.SIGUSR1)        # the window dumps its threads' stacks
        time.sleep(1)                               # (a diagnosis of a failure: let it write)
        pytest.fail("the window process did not exit; its last trace lines:\n"
                    + "\n".join(json.dumps(line)[:300] for line in gui.lines[-20:])
                    + "\nstderr:\n" + "".join(gui.stderr)[-6000:])
    took = time.monotonic() - started
    print(f"window process exited {took:.2f} s after its last window closed")
    assert status == 0, "".join(gui.stderr)[-3000:]
    assert "Traceback" not in "".join(gui.stderr), "".join(gui.stderr)[-3000:]
    orphans = [p for p in os.listdir("/proc") if p.isdigit() and _parent(p) == gui.proc.pid]
    assert not orphans, f"processes left behind: {orphans}"
    return took


EXIT_DEADLINE_S = 15


def _parent(pid: str) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


# --- the GUI's helpers, no display ------------------------------------------

def test_font_family_is_the_first_known_cjk_family():
    assert chatroom.pick_font_family(["DejaVu Sans", "WenQuanYi Micro Hei", "PingFang SC"]) \
        == "PingFang SC"
    assert chatroom.pick_font_family(["Noto Sans CJK SC", "Microsoft YaHei"]) \
        == "Noto Sans CJK SC"
    assert chatroom.pick_font_family(["DejaVu Sans", "Noto Sans CJK JP"]) is None


@pytest.mark.parametrize("width,height", [(560, 340), (900, 300), (300, 700), (1280, 720)])
def test_call_tiles_are_4_3_inside_the_area_apart_and_centred(width, height):
    gap = 6
    for count in range(1, 10):
        boxes = chatroom.tile_grid(count, width, height, gap)
        assert len(boxes) == count
        assert len({(w, h) for _x, _y, w, h in boxes}) == 1          # one size for all
        _x, _y, w, h = boxes[0]
        assert abs(w * 3 / 4 - h) <= 1                               # 4:3
        for x, y, w, h in boxes:
            assert x >= 0 and y >= 0 and x + w <= width and y + h <= height
        for a, b in itertools.combinations(boxes, 2):                # no overlaps
            assert a[0] + a[2] + gap <= b[0] or b[0] + b[2] + gap <= a[0] \
                or a[1] + a[3] + gap <= b[1] or b[1] + b[3] + gap <= a[1]
        left = min(x for x, *_ in boxes)                             # the block is centred
        right = max(x + w for x, _y, w, _h in boxes)
        top = min(y for _x, y, *_ in boxes)
        bottom = max(y + h for _x, y, _w, h in boxes)
        assert abs(left - (width - right)) <= 1 and abs(top - (height - bottom)) <= 1
    # Two people side by side in a wide window, stacked in a tall one; three
    # in a 560 x 340 window: two over one, the one centred under them.
    two = chatroom.tile_grid(2, 560, 340, gap)
    assert two[0][1] == two[1][1]
    tall = chatroom.tile_grid(2, 300, 700, gap)
    assert tall[0][0] == tall[1][0]
    three = chatroom.tile_grid(3, 560, 340, gap)
    assert three[0][1] == three[1][1] < three[2][1]
    assert three[2][0] + three[2][2] / 2 == pytest.approx(280, abs=1)
    assert chatroom.tile_grid(0, 560, 340, gap) == []


def test_avatars_are_stable_per_user_and_show_initials():
    assert chatroom.avatar_colour("alice") == chatroom.avatar_colour("ALICE")   # one ID
    colours = {chatroom.avatar_colour(f"user{n}") for n in range(200)}
    assert len(colours) == len(chatroom.AVATAR_COLOURS)                        # all used
    # The colour comes from SHA-256, not Python's salted hash: the same in
    # another process (and on another machine).
    out = subprocess.run([sys.executable, "-c", "import chatroom; "
                          "print(chatroom.avatar_colour('小明'))"], capture_output=True,
                         text=True, check=True, cwd=Path(chatroom.__file__).parent)
    assert out.stdout.strip() == chatroom.avatar_colour("小明")
    assert chatroom.initials("小明") == "小"
    assert chatroom.initials("ada lovelace") == "AL"
    assert chatroom.initials("bob") == "B"
    assert chatroom.initials("j_r.r-tolkien") == "JR"
    assert chatroom.initials("_") == "?"


def test_settings_live_in_the_platforms_config_folder(tmp_path):
    home = tmp_path
    path = chatroom.settings_path("win32", {"APPDATA": r"C:\Users\a\AppData\Roaming"}, home)
    assert path.parts[-3:] == ("Roaming", "chatroom", "settings.json") or \
        str(path).endswith("chatroom/settings.json")
    assert chatroom.settings_path("darwin", {}, home) == \
        home / "Library" / "Application Support" / "chatroom" / "settings.json"
    assert chatroom.settings_path("linux", {"XDG_CONFIG_HOME": "/xdg"}, home) == \
        Path("/xdg/chatroom/settings.json")
    assert chatroom.settings_path("linux", {}, home) == home / ".config/chatroom/settings.json"
    # The XDG spec: a relative XDG_CONFIG_HOME is ignored.
    assert chatroom.settings_path("linux", {"XDG_CONFIG_HOME": "rel"}, home) == \
        home / ".config/chatroom/settings.json"


@pytest.mark.parametrize("content", [
    b"", b"{", b"null", b"[1, 2]", b'"text"', b"\xff\xfe\x00garbage", b"[" * 100000,
    b'{"room": 5, "user": ["x"], "address": null}', b'{"room": "' + b"x" * 5000 + b'"}',
])
def test_a_corrupt_settings_file_is_ignored(tmp_path, content):
    path = tmp_path / "settings.json"
    path.write_bytes(content)
    assert chatroom.load_settings(path) == {}


def test_settings_round_trip_and_unknown_keys_are_dropped(tmp_path):
    path = tmp_path / "deep" / "chatroom" / "settings.json"
    assert chatroom.load_settings(path) == {}                   # missing: nothing
    assert chatroom.save_settings(path, {"room": "学习", "user": "小明"})
    assert chatroom.load_settings(path) == {"room": "学习", "user": "小明"}
    path.write_text(json.dumps({"room": "r", "evil": "x"}))
    assert chatroom.load_settings(path) == {"room": "r"}
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert not chatroom.save_settings(blocked / "settings.json", {"room": "r"})


class FakeWindow:
    def __init__(self):
        self.posted = []

    def write_event_value(self, key, value):
        self.posted.append((key, value))


def test_the_bridge_posts_core_events_and_command_outcomes_as_tuple_keys():
    import concurrent.futures
    window = FakeWindow()
    bridge = chatroom.GuiBridge(window)
    bridge.on_event({"type": "message", "text": "hi"})
    done, failed, quiet, cancelled = (concurrent.futures.Future() for _ in range(4))
    bridge.report("hosted", done)
    bridge.report("said", failed)
    bridge.report("leave", quiet, quiet=True)
    bridge.report("watch", cancelled)
    done.set_result(47300)
    failed.set_exception(RuntimeError("boom"))
    quiet.set_result(None)
    cancelled.cancel()                      # the core stopped under it: nothing to say
    assert window.posted == [(("-NET-", "message"), {"type": "message", "text": "hi"}),
                             (("-CORE-", "hosted"), 47300),
                             (("-CORE-", "failed"), "said: boom")]
    bridge.detach()
    bridge.on_event({"type": "closed", "reason": "quit"})        # after detach: dropped
    assert len(window.posted) == 3


def test_open_says_when_the_system_has_no_opener(tmp_path, monkeypatch):
    """It used to say "No such file or directory" about a file that was
    there, when xdg-open was missing."""
    there = tmp_path / "报告.pdf"
    there.write_bytes(b"%PDF")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(OSError) as missing:
        chatroom.open_with_os(there)
    assert "xdg-open" in str(missing.value) and "xdg-utils" in str(missing.value)
    with pytest.raises(OSError) as gone:
        chatroom.open_with_os(tmp_path / "gone.pdf")
    assert "not there" in str(gone.value)


def test_scale_flag_and_icon():
    assert chatroom.build_parser().parse_args(["--scale", "1.5"]).scale == 1.5
    assert chatroom.build_parser().parse_args([]).scale == 1.0
    with pytest.raises(SystemExit):
        chatroom.build_parser().parse_args(["--scale", "9"])
    png = chatroom.app_icon_png(32)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png[16:24] == bytes.fromhex(
        "0000002000000020")                                      # 32 x 32


def test_without_a_display_the_window_says_so_and_exits(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    out = subprocess.run([sys.executable, str(Path(chatroom.__file__)), "--interface",
                          LOOPBACK], env=dict(env, XDG_CONFIG_HOME=str(tmp_path)),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "can't open a window" in out.stderr and "--cli" in out.stderr


# --- the window, under Xvfb ---------------------------------------------------------

CLOSE_WHILE_THE_CORE_POSTS = """
import PySimpleGUI as sg
import chatroom
a, b = (sg.Window(name, [[sg.Text(name)]], finalize=True,
                  enable_close_attempted_event=True) for name in "ab")
for window in (a, b):
    chatroom._close_button_posts(window)
sg.read_all_windows(timeout=10)                 # the loop has run once
b.write_event_value(("-NET-", "message"), 1)    # the core posts to b,
b.TKroot.tk.call(b.TKroot.protocol("WM_DELETE_WINDOW"))   # b's close button
print([(window is b, event) for window, event, _values in
       (sg.read_all_windows(timeout=2000) for _ in range(2))])
"""


def test_a_close_button_is_not_lost_to_an_event_the_core_queued(x):
    """PySimpleGUI reports a close button as an event of None and fills it
    with the window's queued event; chatroom queues closes instead."""
    out = subprocess.run([sys.executable, "-c", CLOSE_WHILE_THE_CORE_POSTS], env=x.env(),
                         capture_output=True, text=True, timeout=60,
                         cwd=Path(chatroom.__file__).parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == repr([(True, ("-NET-", "message")),
                                       (True, "-WINDOW CLOSE ATTEMPTED-")])


def test_launcher_lists_hosts_live_and_closes_cleanly(x, tmp_path, procs):
    host = Host(unique("lan"))
    procs.append(host)
    settings = tmp_path / "config/chatroom/settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_bytes(b'{"room": "\xff\xfe broken')     # must not stop the window
    gui = start_gui(x, tmp_path, procs)
    assert gui.window("launcher")["fields"] == {"address": "", "room": "", "user": ""}

    def row(match):
        """Wait for the launcher to show our host in a state `match` accepts."""
        record = gui.wait_for(lambda e: e.get("gui") == "window" and e["name"] == "launcher"
                              and match([r for r in e["rows"] if r["name"] == host.name]), 15)
        return [r for r in record["rows"] if r["name"] == host.name]

    assert row(lambda rows: rows and rows[0]["rooms"] == [])[0]["port"] == host.port
    cli = Cli(host.port, "学习", "小明")
    procs.append(cli)
    row(lambda rows: rows and rows[0]["rooms"] == [{"room": "学习", "members": 1}])
    host.stop()                            # the host withdraws its record: the row goes
    row(lambda rows: not rows)
    gui.close("launcher")
    assert_exits_cleanly(gui)


def test_a_host_killed_without_warning_shows_as_not_answering(x, tmp_path, procs):
    """kill -9 leaves the host's mDNS record behind for minutes; the window
    dials listed hosts (--host-check) and greys the one that is gone, with
    one row saying so; when it is back on its port, it is alive again."""
    host = Host(unique("killed"))
    procs.append(host)
    gui = start_gui(x, tmp_path, procs, "--host-check", "0.5")

    def rows(match):
        record = gui.wait_for(lambda e: e.get("gui") == "window" and e["name"] == "launcher"
                              and match([r for r in e["rows"] if r["name"] == host.name]), 30)
        return [r for r in record["rows"] if r["name"] == host.name]

    rows(lambda found: found and all(r["alive"] for r in found))
    procs.append(Cli(host.port, "lobby", "bob"))    # a room, so the row of it can go
    host.proc.kill()                        # no goodbye: the record stays
    host.proc.wait(10)
    gone = rows(lambda found: found and not found[0]["alive"])
    assert len(gone) == 1 and gone[0]["room"] is None, gone
    again = Host(host.name, extra=["--port", str(host.port)])   # back on its port
    procs.append(again)
    rows(lambda found: found and all(r["alive"] for r in found))
    gui.close("launcher")
    assert_exits_cleanly(gui)


def test_rooms_are_listed_as_entries_to_pick_and_double_click(x, tmp_path, procs):
    """The launcher lists each host's rooms (room, people, host, address) and
    a new room; picking fills the address and the Room ID, double-click
    joins. A stale error goes when another host is picked."""
    host = Host(unique("rooms"))
    procs.append(host)
    for room, user in (("学习", "小明"), ("lobby", "bob"), ("lobby", "carol")):
        procs.append(Cli(host.port, room, user))
    gui = start_gui(x, tmp_path, procs, "--user", "alice")
    listed = gui.wait_for(lambda e: e.get("gui") == "window" and e["name"] == "launcher"
                          and [(r["room"]) for r in e["rows"] if r["name"] == host.name]
                          == ["lobby", "学习", None], 20)
    rows = {r["room"]: r for r in listed["rows"] if r["name"] == host.name}
    # A stale error: try to join with nothing picked and no Room ID.
    mark = gui.mark()
    gui.click("launcher", "join")
    assert gui.wait_for(lambda e: e.get("gui") == "launcher_status" and e["error"],
                        start=mark)["text"]
    mark = gui.mark()
    box = rows["学习"]["box"]
    gui.x.wait_viewable(listed["xid"])
    x.click(box[0] + box[2] / 2, box[1] + box[3] / 2)
    gui.wait_for(lambda e: e.get("gui") == "launcher_status" and e["text"] == "", 10, mark)
    picked = gui.wait_for(lambda e: e.get("gui") == "window" and e["name"] == "launcher"
                          and e["fields"]["room"] == "学习", 10, mark)
    assert picked["fields"]["address"] == f"{LOOPBACK}:{host.port}"
    box = rows["lobby"]["box"]
    mark = gui.mark()
    x.double_click(box[0] + box[2] / 2, box[1] + box[3] / 2)
    chat = gui.window("chat", start=mark)
    assert chat["name"] == "chat"
    ready = gui.wait_for(lambda e: e.get("gui") == "event" and e["event"]["type"] == "ready",
                         10, mark)["event"]
    assert (ready["room"], ready["members"]) == ("lobby", ["bob", "carol", "alice"])
    gui.close("chat")
    assert_exits_cleanly(gui)


def test_two_people_chat_in_chinese_and_english(x, tmp_path, procs):
    host = Host(unique("chat"), advertise=False)
    procs.append(host)
    gui = start_gui(x, tmp_path, procs, "--server", f"{LOOPBACK}:{host.port}",
                    "--room", "lobby", "--user", "alice")
    join_from_launcher(gui, x)
    cli = Cli(host.port, "lobby", "小明")
    procs.append(cli)
    assert cli.ready["members"] == ["alice", "小明"]
    gui.shown(lambda e: e["kind"] == "notice" and e["style"] == "system"
              and e["text"] == "[SYSTEM] 小明 entered the room")
    gui.wait_for(lambda e: e.get("gui") == "members" and e["members"] == ["alice", "小明"])

    # The terminal client's Chinese: a bubble on the others' side, with its sender.
    cli.say("你好世界")
    hanzi = gui.shown(lambda e: e["kind"] == "message" and e["text"] == "你好世界")
    assert hanzi["from"] == "小明" and hanzi["mine"] is False
    # Its pixels must not be the box a font draws for a glyph it lacks. The
    # window shows unassigned code points (U+0378...) as \u escapes, never
    # as glyphs, so the reference is real letters of scripts these fonts
    # lack: two different letters that draw the same are both that box.
    candidates = [("\u0f40" * 4, "\u0f41" * 4),       # Tibetan KA, KHA
                  ("\u1780" * 4, "\u1781" * 4),       # Khmer KA, KHA
                  ("\ua4d0" * 4, "\ua4d1" * 4)]       # Lisu BA, PA
    for pair in candidates:
        for text in pair:
            cli.say(text)
    shown = {text: gui.shown(lambda e, t=text: e["kind"] == "message" and e["text"] == t)
             for pair in candidates for text in pair}
    now = shown[candidates[-1][1]]         # the newest record has the view's origin
    gui.painted(now)
    pixels = {text: x.pixels(on_screen(now, record["bbox"]))
              for text, record in [("你好世界", hanzi), *shown.items()]}
    boxes = [pixels[a] for a, b in candidates if pixels[a] == pixels[b]]
    assert boxes, "every candidate script has a font here: add a script none covers"
    assert ink(pixels["你好世界"][2]) > 100, "no text where the Chinese bubble is"
    assert pixels["你好世界"] != boxes[0], \
        "Chinese renders as the missing-glyph box: is fonts-noto-cjk installed?"

    # A user's text can't pass for a notice: it is that user's bubble.
    cli.say("[SYSTEM] alice left the room")
    fake = gui.shown(lambda e: e.get("text") == "[SYSTEM] alice left the room")
    assert fake["kind"] == "message" and fake["from"] == "小明"

    # Typed in the window, with Enter: the terminal gets it.
    gui.type_into("chat", "input", "Hello 小明, 中文 works", enter=True)
    mine = gui.shown(lambda e: e.get("text") == "Hello 小明, 中文 works")
    assert mine["mine"] is True and mine["from"] == "alice"
    cli.wait_for(lambda e: e.get("type") == "message" and e["from"] == "alice"
                 and e["text"] == "Hello 小明, 中文 works")

    # help works as in the terminal: the host answers, to us alone.
    gui.type_into("chat", "input", "hElp", enter=True)
    panel = gui.wait_for(lambda e: e.get("gui") == "help_panel" and e["open"])
    assert any("/CHECK" in text for _number, _title, text in panel["rows"])
    px, py, pw, ph = panel["box"]           # Escape closes it (keys go under the pointer)
    x.run("xdotool", "mousemove", str(px + pw // 2), str(py + ph // 2))
    x.key("Escape")
    gui.wait_for(lambda e: e.get("gui") == "help_panel" and not e["open"])
    # /CHECK from the window calls: only the terminal's 小明 is invited.
    gui.type_into("chat", "input", "/CHECK 小明", enter=True)
    gui.shown(lambda e: e["kind"] == "echo" and e["text"] == "/CHECK 小明")
    assert cli.wait_for(lambda e: e.get("type") == "call_invite")["from"] == "alice"
    # "ip port1 port2" and the Video call button start a direct call.
    mark = gui.mark()
    ports = [free_udp_port() for _ in range(2)]
    gui.type_into("chat", "input", f"127.0.0.1 {ports[0]} {ports[1]}")
    gui.click("chat", "video")
    gui.shown(lambda e: e["kind"] == "echo"
              and e["text"] == f"Video call 127.0.0.1 {ports[0]} {ports[1]}", start=mark)
    gui.type_into("chat", "input", "127.0.0.1 5000")           # not an address and 2 ports
    gui.click("chat", "video")
    gui.shown(lambda e: e["kind"] == "notice" and e["style"] == "error"
              and "two ports" in e["text"], start=mark)
    # The button reads the line as Enter would: "/call ip p1 p2" is the same call.
    more = [free_udp_port() for _ in range(2)]
    gui.type_into("chat", "input", f"/call 127.0.0.1 {more[0]} {more[1]}")
    gui.click("chat", "video")
    gui.shown(lambda e: e["kind"] == "echo"
              and e["text"] == f"Video call /call 127.0.0.1 {more[0]} {more[1]}", start=mark)
    gui.type_into("chat", "input", "/who", enter=True)
    gui.shown(lambda e: e["kind"] == "notice" and e["text"] == "In the room (2): alice, 小明")

    assert cli.quit() == 0
    gui.shown(lambda e: e["kind"] == "notice" and e["text"] == "[SYSTEM] 小明 left the room")
    gui.wait_for(lambda e: e.get("gui") == "members" and e["members"] == ["alice"])
    assert json.loads((tmp_path / "config/chatroom/settings.json").read_text()) == {
        "room": "lobby", "user": "alice", "address": f"{LOOPBACK}:{host.port}"}
    gui.close("chat")
    assert_exits_cleanly(gui)
    # Next time, the launcher remembers.
    again = start_gui(x, tmp_path, procs)
    assert again.window("launcher")["fields"] == {
        "room": "lobby", "user": "alice", "address": f"{LOOPBACK}:{host.port}"}
    again.close("launcher")
    assert_exits_cleanly(again)


def test_leave_goes_back_to_the_launcher_and_a_late_joiner_gets_history(x, tmp_path,
                                                                        procs):
    host = Host(unique("leave"), advertise=False)
    procs.append(host)
    bob = Cli(host.port, "r", "bob")
    procs.append(bob)
    bob.say("said before you came, 你来之前")
    bob.wait_for(lambda e: e.get("type") == "message")
    gui = start_gui(x, tmp_path, procs, "--server", f"{LOOPBACK}:{host.port}", "--room", "r",
                    "--user", "alice")
    join_from_launcher(gui, x)
    gui.shown(lambda e: e["kind"] == "divider" and e["text"] == "Earlier messages")
    earlier = gui.shown(lambda e: e["kind"] == "message")
    assert earlier["text"] == "said before you came, 你来之前" and earlier["history"] is True
    mark = gui.mark()
    gui.click("chat", "leave")
    gui.phase("choosing", start=mark)
    gui.window("launcher", start=mark)                  # shown again
    assert gui.wait_for(lambda e: e.get("gui") == "launcher_status", start=mark)["text"] \
        == "You left r."
    bob.wait_for(lambda e: e.get("type") == "system" and e["event"] == "leave")
    mark = gui.mark()
    gui.click("launcher", "join")                        # and in again
    gui.phase("chatting", start=mark)
    bob.say("welcome back")
    gui.shown(lambda e: e.get("text") == "welcome back", start=mark)
    gui.close("chat")
    assert_exits_cleanly(gui)


def test_scale_makes_the_window_bigger(x, tmp_path, procs):
    """What it draws, that is: the window itself fits the screen (at 1.5
    the launcher is wider than this 1280x800 one), so measure a button."""
    sizes = []
    for scale in ("1", "1.5"):
        gui = start_gui(x, tmp_path, procs, "--scale", scale)
        sizes.append(gui.window("launcher")["elements"]["host"][2:])
        gui.close("launcher")
        assert_exits_cleanly(gui)
    ratio = [big / small for small, big in zip(*sizes)]
    assert all(1.35 < r < 1.65 for r in ratio), sizes


def test_a_file_arrives_with_its_progress_bar_and_opens(x, tmp_path, procs):
    host = Host(unique("files"), advertise=False)
    procs.append(host)
    opened, env = opener_stub(tmp_path)
    gui = start_gui(x, tmp_path, procs, "--server", f"{LOOPBACK}:{host.port}", "--room", "r",
                    "--user", "alice", env=env)
    join_from_launcher(gui, x)
    cli = Cli(host.port, "r", "bob", downloads=tmp_path / "cli-downloads")
    procs.append(cli)
    data = os.urandom(48 * 1024 * 1024)
    (tmp_path / "报告 report.bin").write_bytes(data)
    cli.say(f"/send {tmp_path / '报告 report.bin'}")

    card = gui.shown(lambda e: e["kind"] == "file")
    assert card["name"] == "报告 report.bin" and card["user"] == "bob" and card["percent"] == 0
    done = gui.wait_for(lambda e: e.get("gui") == "file_card" and e["state"] != "moving", 60)
    assert done["state"] == "done", done
    percents = [e["percent"] for e in gui.lines if e.get("gui") == "file_card"]
    assert any(0 < p < 100 for p in percents), f"no progress shown between: {percents}"
    assert percents == sorted(percents)
    saved = Path(done["path"])
    assert saved.parent == tmp_path / "gui-downloads"
    assert hashlib.sha256(saved.read_bytes()).digest() == hashlib.sha256(data).digest()

    # "Open" and "Show in folder" on the card hand the file, then its folder,
    # to the system's opener.
    gui.painted(done)
    for link, expected in (("open", [str(saved)]), ("folder", [str(saved), str(saved.parent)])):
        box = on_screen(done, done["links"][link])
        x.click(box[0] + box[2] / 2, box[1] + box[3] / 2)
        deadline = time.monotonic() + 5
        while (not opened.exists() or len(opened.read_text().split("\n")) <= len(expected)) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert opened.read_text().splitlines() == expected

    # And the other way, to bob alone: pick him in the members list, press
    # "Send file", choose the file in the dialog. Carol gets nothing.
    carol = Cli(host.port, "r", "carol", downloads=tmp_path / "carol-downloads")
    procs.append(carol)
    members = gui.wait_for(lambda e: e.get("gui") == "members" and len(e["members"]) == 3)
    bob_row = next(r for r in members["rows"] if r["user"] == "bob")["box"]
    x.click(bob_row[0] + bob_row[2] / 2, bob_row[1] + bob_row[3] / 2)
    gui.wait_for(lambda e: e.get("gui") == "picked" and e["user"] == "bob")
    (tmp_path / "back.txt").write_text("返回 back")
    mark = gui.mark()
    gui.click("chat", "file")
    # Type only once the dialog is up with its file name entry focused: keys
    # typed before that went nowhere (the test failed on a busy machine).
    dx, dy, dw, dh = gui.wait_for(lambda e: e.get("gui") == "dialog", 20, mark)["box"]
    # Xvfb has no window manager: keys go to the window under the pointer.
    x.run("xdotool", "mousemove", str(dx + dw // 2), str(dy + dh // 2))
    x.type(str(tmp_path / "back.txt"))
    x.key("Return")
    got = cli.wait_for(lambda e: e.get("type") == "file_received", 20)
    assert Path(got["path"]).read_text() == "返回 back"
    offer = cli.wait_for(lambda e: e.get("type") == "file_offer")
    assert offer["to"] == "bob"
    gui.wait_for(lambda e: e.get("gui") == "file_card" and e["direction"] == "send"
                 and e["status"] == "Saved by bob")
    # /send PATH @USER in the input line does the same.
    gui.type_into("chat", "input", f"/send {tmp_path / 'back.txt'} @carol", enter=True)
    assert carol.wait_for(lambda e: e.get("type") == "file_received", 20)["from"] == "alice"
    assert not [e for e in carol.lines if e.get("type") == "file_offer" and e["to"] != "carol"]
    gui.close("chat")
    assert_exits_cleanly(gui)


def test_host_a_room_here_then_a_terminal_joins(x, tmp_path, procs):
    name = unique("here")
    gui = start_gui(x, tmp_path, procs, "--port", "0", "--name", name, "--room", "大厅",
                    "--user", "host-alice")
    gui.click("launcher", "host")
    port = gui.wait_for(lambda e: e.get("gui") == "listening")["port"]
    gui.phase("chatting")
    found = Proc(["--discover", "--json", "--interface", LOOPBACK, "--name", name,
                  "--timeout", "3"])
    procs.append(found)
    assert found.wait_for(lambda e: e.get("type") == "host")["port"] == port
    cli = Cli(port, "大厅", "bob", extra=["--retry-for", "0"])   # the host's end is its end
    procs.append(cli)
    assert cli.ready["members"] == ["host-alice", "bob"]
    cli.say("hi from the terminal")
    gui.shown(lambda e: e.get("text") == "hi from the terminal" and e["from"] == "bob")
    mark = gui.mark()
    gui.close("chat")                       # bob is in our room: it asks first
    assert "1 person" in gui.window("confirm", start=mark)["text"]
    gui.click("confirm", "yes")
    assert_exits_cleanly(gui)
    cli.wait_for(lambda e: e.get("type") == "closed" and e["reason"] == "host_shutdown")
    # The mDNS record went with the host.
    gone = Proc(["--discover", "--json", "--interface", LOOPBACK, "--name", name,
                 "--timeout", "1.5"])
    procs.append(gone)
    assert gone.wait_exit(10) == 0
    assert not [e for e in gone.lines if e.get("type") == "host"]


def _version_mismatch_server(keys: Path) -> tuple[socket.socket, int]:
    """A stand-in host from the future: answers any hello as a newer host
    would (in TLS, with a key of its own kept in `keys`)."""
    server = socket.create_server((LOOPBACK, 0))
    tls = chatroom.HostKey.load_or_create(keys).server_context()

    def serve():
        with server:
            conn, _ = server.accept()
            with tls.wrap_socket(conn, server_side=True) as conn:
                conn.recv(65536)
                conn.sendall(chatroom.encode(chatroom.Error(
                    "version_mismatch", "this host speaks protocol version 99; you sent 1")))
                time.sleep(0.5)

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def test_join_problems_show_inline_and_the_launcher_stays(x, tmp_path, procs):
    host = Host(unique("errors"), advertise=False)
    procs.append(host)
    bob = Cli(host.port, "lobby", "Bob")
    procs.append(bob)
    gui = start_gui(x, tmp_path, procs, "--server", f"{LOOPBACK}:{host.port}",
                    "--room", "lobby", "--user", "bob")

    def attempt(field: str | None = None, text: str = "", network: bool = True) -> str:
        """Type `text` in `field`, click Join: the error shown, once the
        launcher is ready for another try (no chat window in between)."""
        mark = gui.mark()
        if field:
            gui.type_into("launcher", field, text)
        gui.click("launcher", "join")
        status = gui.wait_for(lambda e: e.get("gui") == "launcher_status" and e["error"],
                              10, mark)
        if network:                         # the host refused or was not there
            gui.phase("choosing", start=mark)
        assert not [e for e in gui.lines[mark:] if e.get("gui") == "window"
                    and e["name"] == "chat"]
        return status["text"]

    assert "already in this room" in attempt()                          # user_taken
    assert "User ID" in attempt("user", "a/b", network=False)            # checked here
    assert "SYSTEM" in attempt("user", "Ѕystem", network=False)          # a look-alike
    gui.type_into("launcher", "user", "carol")
    assert "Can't reach" in attempt("address", f"{LOOPBACK}:{closed_port()}")  # unreachable
    _server, port = _version_mismatch_server(tmp_path / "future-key")
    assert "different version" in attempt("address", f"{LOOPBACK}:{port}")
    gui.type_into("launcher", "address", f"{LOOPBACK}:{host.port}")
    join_from_launcher(gui, x)                                            # then it works
    gui.close("chat")
    assert_exits_cleanly(gui)


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (it did a moment ago)."""
    closed = socket.create_server((LOOPBACK, 0))
    port = closed.getsockname()[1]
    closed.close()
    return port


def join_fails(gui: Gui) -> tuple[dict, dict, dict]:
    """Click Join and wait for the error it ends in: (the launcher's
    layout before, the error's trace line, the layout after it)."""
    before = gui.window("launcher")
    mark = gui.mark()
    gui.click("launcher", "join")
    status = gui.wait_for(lambda e: e.get("gui") == "launcher_status" and e["error"], 30, mark)
    after = gui.wait_for(lambda e: e.get("gui") == "window" and e["name"] == "launcher", 30,
                         gui.lines.index(status))
    return before, status, after


def assert_shown_whole(status: dict, layout: dict) -> None:
    """The error of `status` shows whole in the launcher of `layout`: its
    box is as tall as its wrapped lines ask, inside the window, and about
    as wide as the window (it wraps there, not at a fixed width)."""
    sx, sy, sw, sh = status["box"]
    wx, wy, ww, wh = layout["box"]
    assert status["shown"] == status["text"], status
    assert sh >= status["asked"] > 0, f"the error is cut: {status}"
    assert wx <= sx and sx + sw <= wx + ww and wy <= sy and sy + sh <= wy + wh, (status, layout)
    assert sw > 0.8 * ww, f"the error wraps short of the window's width: {status}, {layout}"


# What a person should never have to read: Python's words for a failure.
_PYTHON_WORDS = ("Errno", "Connect call failed", "('127.0.0.1'", "Traceback", "OSError",
                 "ConnectionRefusedError", "Multiple exceptions", "Error(", "exception")


def test_a_join_error_is_a_sentence_not_python_exception_text(x, tmp_path, procs):
    """Nothing listens on the port: the launcher says so in words
    (why_unreachable), never as the exception asyncio raised ("[Errno 111]
    Connect call failed ('127.0.0.1', 4242)")."""
    port = closed_port()
    gui = start_gui(x, tmp_path, procs, "--server", f"{LOOPBACK}:{port}", "--room", "r",
                    "--user", "u")
    _before, status, _after = join_fails(gui)
    text = status["text"]
    assert text.startswith(f"Can't reach {LOOPBACK}:{port}: nothing is listening there"), text
    assert text[0].isupper() and text.endswith("."), text
    assert not [word for word in _PYTHON_WORDS if word.lower() in text.lower()], text
    gui.close("launcher")
    assert_exits_cleanly(gui)


def test_the_longest_join_error_shows_whole_and_join_stays_put(x, tmp_path, procs):
    """A host found on the LAN whose port takes no connections gets the
    firewall hint: the longest error there is. It used to show in two
    lines of a fixed width, cut at "...but its". Now it wraps to the
    window's width, whole, and the list makes room: Join doesn't move."""
    host = Host(unique("firewalled"))
    procs.append(host)
    gui = start_gui(x, tmp_path, procs, "--room", "r", "--user", "u")
    gui.wait_for(lambda e: e.get("gui") == "window" and e["name"] == "launcher"
                 and any(r["name"] == host.name for r in e["rows"]), 30)
    host.proc.kill()                        # no goodbye: it stays listed, its port closed
    host.proc.wait(10)
    gui.type_into("launcher", "address", f"{LOOPBACK}:{host.port}")
    before, status, after = join_fails(gui)
    assert status["text"].endswith(chatroom.firewall_hint(host.port) + "."), status
    assert not [word for word in _PYTHON_WORDS if word.lower() in status["text"].lower()]
    assert_shown_whole(status, after)
    assert after["box"] == before["box"], "the error resized the window"
    assert after["elements"]["join"] == before["elements"]["join"], "Join moved"
    x.screenshot(tmp_path / "launcher-long-error.png", after["xid"])
    gui.close("launcher")
    assert_exits_cleanly(gui)


def test_on_a_small_screen_the_launcher_fits_with_join_on_it(tmp_path, procs):
    """At --scale 1.5 the launcher was 991 px tall (on a 980 px screen),
    and Join was off a 1280x720 one. Now the window fits the screen and the
    hosts list is what shrinks, for an error too."""
    small = Xvfb(1280, 720).start()
    try:
        port = closed_port()
        for scale in ("1", "1.5"):
            gui = start_gui(small, tmp_path, procs, "--server", f"{LOOPBACK}:{port}",
                            "--room", "r", "--user", "u", "--scale", scale)
            before, status, after = join_fails(gui)
            for layout in (before, after):
                wx, wy, ww, wh = layout["box"]
                assert wx >= 0 and wy >= 0 and wx + ww <= 1280 and wy + wh <= 720, layout
                jx, jy, jw, jh = layout["elements"]["join"]
                assert wx <= jx and jx + jw <= wx + ww and wy <= jy and jy + jh <= wy + wh, \
                    f"Join is cut off: {layout}"
            assert after["elements"]["join"] == before["elements"]["join"], "Join moved"
            assert_shown_whole(status, after)
            small.screenshot(tmp_path / f"launcher-small-{scale}.png", after["xid"])
            gui.close("launcher")
            assert_exits_cleanly(gui)
    finally:
        small.stop()


def test_tooltips_get_lines_broken_between_words():
    """A launcher error past _STATUS_MOST_CHARS is cut, and whole in its
    tooltip, which doesn't wrap by itself."""
    assert chatroom._wrapped("one two three four", 9) == "one two\nthree\nfour"
    assert chatroom._wrapped("a " + "x" * 12 + " b", 5) == "a\n" + "x" * 12 + "\nb"
    assert chatroom._wrapped("", 5) == ""


def test_hosting_on_a_taken_port_says_so_in_the_launcher(x, tmp_path, procs):
    host = Host(unique("taken"), advertise=False)
    procs.append(host)
    gui = start_gui(x, tmp_path, procs, "--port", str(host.port), "--room", "r",
                    "--user", "u")
    try:
        mark = gui.mark()
        gui.click("launcher", "host")
        status = gui.wait_for(lambda e: e.get("gui") == "launcher_status" and e["error"],
                              8, mark)
        assert "can't host on port" in status["text"].lower()
        assert "another program listens on it" in status["text"], status  # and the fix
        gui.phase("choosing", start=mark + 1)          # ready for another try
    finally:
        gui.close("launcher")                  # closing works even then
        assert_exits_cleanly(gui)


def test_closing_the_launcher_at_once(x, tmp_path, procs):
    gui = start_gui(x, tmp_path, procs)
    gui.close("launcher")
    assert_exits_cleanly(gui)


def test_closing_the_launcher_while_joining(x, tmp_path, procs):
    # A host that accepts and never answers: the login would wait 5 s.
    silent = socket.create_server((LOOPBACK, 0))
    try:
        gui = start_gui(x, tmp_path, procs, "--server",
                        f"{LOOPBACK}:{silent.getsockname()[1]}", "--room", "r", "--user", "u")
        gui.click("launcher", "join")
        gui.phase("joining")
        gui.close("launcher")
        assert_exits_cleanly(gui)
    finally:
        silent.close()


@pytest.mark.parametrize("delay", [0.0, 0.6])
def test_closing_the_launcher_while_the_host_starts(x, tmp_path, procs, delay):
    name = unique("starting")
    gui = start_gui(x, tmp_path, procs, "--port", "0", "--name", name, "--room", "r",
                    "--user", "u")
    gui.click("launcher", "host")
    gui.phase("hosting")
    time.sleep(delay)                       # the mDNS registration takes ~1.6 s
    gui.close("launcher")
    assert_exits_cleanly(gui)
    found = Proc(["--discover", "--json", "--interface", LOOPBACK, "--name", name,
                  "--timeout", "1.5"])
    procs.append(found)
    assert found.wait_exit(10) == 0
    assert not [e for e in found.lines if e.get("type") == "host"]


def test_closing_the_chat_window_during_a_file_transfer(x, tmp_path, procs):
    host = Host(unique("busy"), advertise=False)
    procs.append(host)
    # --ask-above: the window asks before files over 100 MiB; this one should just come.
    gui = start_gui(x, tmp_path, procs, "--server", f"{LOOPBACK}:{host.port}", "--room", "r",
                    "--user", "alice", "--ask-above", "2G")
    join_from_launcher(gui, x)
    cli = Cli(host.port, "r", "bob")
    procs.append(cli)
    with open(tmp_path / "big.bin", "wb") as big:
        big.truncate(1024 ** 3)            # 1 GiB of zeros, sparse: it takes a while
    cli.say(f"/send {tmp_path / 'big.bin'}")
    gui.wait_for(lambda e: e.get("gui") == "file_card" and 0 < e["percent"] < 100, 20)
    # Closing asks first while a file moves: "Keep it open" keeps it open...
    mark = gui.mark()
    gui.close("chat")
    asked = gui.window("confirm", start=mark)
    assert "file" in asked["text"]
    gui.click("confirm", "no")
    gui.type_into("chat", "input", "still here", enter=True)
    cli.wait_for(lambda e: e.get("type") == "message" and e["text"] == "still here")
    # ... and "Close anyway" closes, at once.
    mark = gui.mark()
    gui.close("chat")
    gui.window("confirm", start=mark)
    gui.click("confirm", "yes")
    assert_exits_cleanly(gui)
    cli.wait_for(lambda e: e.get("type") == "system" and e["event"] == "leave")


def test_a_flood_of_messages_keeps_the_window_responsive(x, tmp_path, procs):
    """2000 messages as fast as a terminal client sends them. Prints how long
    the window's loop took per read and per message; asserts only that every
    message shows, in order, and that the window still answers afterwards."""
    count = 2000
    host = Host(unique("flood"), advertise=False,
                extra=["--rate-limit", "0"])        # a flood on purpose: no flood control
    procs.append(host)
    gui = start_gui(x, tmp_path, procs, "--server", f"{LOOPBACK}:{host.port}", "--room", "r",
                    "--user", "alice")
    join_from_launcher(gui, x)
    cli = Cli(host.port, "r", "flood")
    procs.append(cli)
    mark, cli_mark = gui.mark(), cli.mark()
    started = time.monotonic()
    cli.proc.stdin.write("".join(f"消息 message {n}\n" for n in range(count)).encode())
    cli.proc.stdin.flush()
    last = gui.shown(lambda e: e.get("text") == f"消息 message {count - 1}", 60, mark)
    finished = time.monotonic()
    shown = [e["text"] for e in gui.lines[mark:] if e.get("gui") == "shown"
             and e["kind"] == "message"]
    assert shown == [f"消息 message {n}" for n in range(count)]
    assert last["from"] == "flood"

    # Latency per message: the terminal client's echo (its host confirmed it)
    # to the window's drawing of it, both as this process saw the lines arrive.
    sent_at = {e["text"]: stamp for e, stamp in zip(cli.lines[cli_mark:],
                                                    cli.stamps[cli_mark:])
               if e.get("type") == "message"}
    latency = sorted(stamp - sent_at[e["text"]] for e, stamp in
                     zip(gui.lines[mark:], gui.stamps[mark:])
                     if e.get("gui") == "shown" and e.get("text") in sent_at)
    gui.type_into("chat", "input", "still here", enter=True)          # still answers
    cli.wait_for(lambda e: e.get("type") == "message" and e["text"] == "still here", 10)
    gui.close("chat")
    assert_exits_cleanly(gui)
    # The window's own loop timings, from its trace: one record per 500
    # iterations; those that ended after the flood began.
    loops = [e for e in gui.lines[mark:] if e.get("gui") == "loop" and e["count"] == 500]
    read = {q: max(e["read_ms"][q] for e in loops) for q in ("p50", "p99", "max")}
    handler = {q: max(e["handler_ms"][q] for e in loops) for q in ("p50", "p99", "max")}
    print(f"\nflood: {count} messages shown in {finished - started:.2f} s "
          f"({count / (finished - started):.0f}/s); terminal echo -> window drew it: "
          f"median {1000 * statistics.median(latency):.0f} ms, "
          f"p95 {1000 * latency[int(0.95 * len(latency))]:.0f} ms, "
          f"max {1000 * latency[-1]:.0f} ms; window.read came back in p50 {read['p50']:.2f} "
          f"/ p99 {read['p99']:.2f} / max {read['max']:.2f} ms; a handler took p50 "
          f"{handler['p50']:.2f} / p99 {handler['p99']:.2f} / max {handler['max']:.2f} ms "
          f"(worst of {len(loops)} windows of 500 reads)")


def chats_at_each_scale(screen: Xvfb, tmp_path, procs, name: str):
    """On `screen`, a host, then for --scale 1 and 1.5 in turn a window
    joined to it: yields (scale, gui, its chat window's layout); the test
    closes each window before asking for the next."""
    host = Host(unique(name), advertise=False)
    procs.append(host)
    for scale in ("1", "1.5"):
        gui = start_gui(screen, tmp_path, procs, "--server", f"{LOOPBACK}:{host.port}",
                        "--room", "r", "--user", f"{name[0]}{scale[0]}", "--scale", scale)
        yield scale, gui, join_from_launcher(gui, screen)


def test_on_a_small_screen_the_window_fits_and_shows_the_message_box(tmp_path, procs):
    """The message box and Send were cut off first when the window was
    shorter than it wanted (a 150% scale on a smaller screen): now the window
    fits the screen and the conversation shrinks instead."""
    small = Xvfb(900, 560).start()
    try:
        for _scale, gui, layout in chats_at_each_scale(small, tmp_path, procs, "small"):
            wx, wy, ww, wh = layout["box"]
            assert wx >= 0 and wx + ww <= 900 and wy >= 0 and wy + wh <= 560, layout["box"]
            assert_all_shown(layout)       # the header's buttons too: the names give way
            gui.type_into("chat", "input", "fits", enter=True)      # and it works
            gui.shown(lambda e: e.get("text") == "fits")
            gui.close("chat")
            assert_exits_cleanly(gui)
    finally:
        small.stop()


# What a chat window must always show whole, however small it is made.
_CHAT_CONTROLS = ("ask", "sound", "theme", "leave", "members", "target", "file", "video",
                  "input", "emoji", "send")


def assert_all_shown(layout: dict) -> None:
    """Each of _CHAT_CONTROLS lies whole inside the window (a "window"
    trace line of the chat window)."""
    wx, wy, ww, wh = layout["box"]
    for name in _CHAT_CONTROLS:
        ex, ey, ew, eh = layout["elements"][name]
        assert ew > 1 and eh > 1, (name, layout)
        assert wx <= ex and ex + ew <= wx + ww and wy <= ey and ey + eh <= wy + wh, \
            f"{name} is cut off: window {layout['box']}, {name} {[ex, ey, ew, eh]}"


def test_at_its_smallest_the_chat_window_still_shows_every_button(tmp_path, procs):
    """A review shrank the window to its minimum (1920x980, --scale 1 and
    1.5): "Sound: off" was cut, the theme button, Leave and part of the
    members were off the window's edge. The minimum width now leaves the
    header's buttons and the members what they ask for, and a narrower
    window cuts the room's name and the conversation instead."""
    screen = Xvfb(1920, 980).start()
    try:
        for scale, gui, layout in chats_at_each_scale(screen, tmp_path, procs, "min"):
            mark = gui.mark()
            least = shrink_to_minimum(screen, layout)
            assert least[0] < layout["box"][2] and least[1] < layout["box"][3], (least, layout)
            smallest = gui.wait_for(lambda e, least=least: e.get("gui") == "window"
                                    and e["name"] == "chat"
                                    and e["box"][2:] == least, 30, mark)
            assert_all_shown(smallest)
            screen.screenshot(tmp_path / f"chat-smallest-{scale}.png", smallest["xid"])
            gui.close("chat")
            assert_exits_cleanly(gui)
    finally:
        screen.stop()


def test_a_frozen_then_vanished_host_greys_the_input_and_marks_unsent_lines(
        x, tmp_path, procs):
    """With --retry-for 0 the window doesn't try to get back: the host's
    end is the end, and says so."""
    host = Host(unique("frozen"), advertise=False, extra=["--login-timeout", "5"])
    procs.append(host)
    gui = start_gui(x, tmp_path, procs, "--server", f"{LOOPBACK}:{host.port}", "--room", "r",
                    "--user", "alice", "--retry-for", "0")
    join_from_launcher(gui, x)
    host.proc.send_signal(signal.SIGSTOP)       # the host freezes: nothing comes back
    try:
        gui.type_into("chat", "input", "into the void", enter=True)
        sent = gui.shown(lambda e: e.get("text") == "into the void")
        assert sent["mine"] is True and sent["state"] == "sending"
        # Not confirmed after a while: the line says so (it didn't vanish).
        gui.wait_for(lambda e: e.get("gui") == "message_state" and e["state"] == "late", 15)
    finally:
        # Gone for good while still frozen (SIGKILL ends a stopped process):
        # woken first, it could confirm the line before it died.
        host.proc.kill()
        host.proc.wait(10)
    gui.wait_for(lambda e: e.get("gui") == "ended", 60)
    unsent = gui.wait_for(lambda e: e.get("gui") == "message_state" and e["state"] == "unsent")
    assert unsent["text"] == "into the void"
    layout = gui.wait_for(lambda e: e.get("gui") == "window" and e["name"] == "chat"
                          and e.get("disabled", {}).get("input"))
    assert layout["disabled"]["send"] is True and "Nothing you type now is sent" in \
        layout["banner"], layout
    gui.close("chat")
    assert_exits_cleanly(gui)


def test_a_host_that_restarts_gets_the_window_back_and_nothing_typed_is_lost(
        x, tmp_path, procs):
    """The host is killed: the window says it is reconnecting, lets you
    type (the line shows as sending), and when a host is back on that port
    it is in the room again and the line goes, once."""
    name = unique("restart")
    host = Host(name, advertise=False)
    procs.append(host)
    gui = start_gui(x, tmp_path, procs, "--server", f"{LOOPBACK}:{host.port}", "--room", "r",
                    "--user", "alice")
    join_from_launcher(gui, x)
    host.proc.kill()                        # no goodbye
    host.proc.wait(10)
    gui.wait_for(lambda e: e.get("gui") == "reconnecting", 30)
    layout = gui.wait_for(lambda e: e.get("gui") == "window" and e["name"] == "chat"
                          and "reconnecting" in e.get("banner", ""), 10)
    assert not layout["disabled"]["input"], layout      # typing still works
    gui.type_into("chat", "input", "typed while away", enter=True)
    sent = gui.shown(lambda e: e.get("text") == "typed while away")
    assert sent["mine"] is True and sent["state"] == "sending"
    again = Host(name, advertise=False, extra=["--port", str(host.port)])
    procs.append(again)
    back = gui.wait_for(lambda e: e.get("gui") == "back", 60)
    assert back["fresh"] is True            # a new host: a new seat
    gui.wait_for(lambda e: e.get("gui") == "message_state" and e["state"] == "sent"
                 and e["text"] == "typed while away", 20)
    bob = Cli(again.port, "r", "bob")
    procs.append(bob)
    gui.type_into("chat", "input", "and after", enter=True)
    bob.wait_for(lambda e: e.get("type") == "message" and e["text"] == "and after")
    gui.close("chat")
    assert_exits_cleanly(gui)


def _pick_host(gui, x, name: str, key: str) -> dict:
    """Click the launcher's row of the host called `name` with `key` (hosts
    of other runs on this machine may come and go and move it: click
    again then); the launcher's layout once that host is picked."""
    def ours(layout: dict) -> list[dict]:
        return [r for r in layout["rows"] if r["name"] == name and r["key"] == key
                and r["box"]]

    gui.wait_for(lambda e: e.get("gui") == "window" and e["name"] == "launcher"
                 and ours(e), 20)
    for _attempt in range(5):
        listed = gui.window("launcher")     # the latest layout
        if not ours(listed):
            continue
        row = ours(listed)[0]
        mark = gui.mark()
        gui.x.wait_viewable(listed["xid"])
        x.click(row["box"][0] + row["box"][2] / 2, row["box"][1] + row["box"][3] / 2)
        picked = gui.wait_for(lambda e: e.get("gui") == "window" and e["name"] == "launcher"
                              and e["key"], 10, mark)
        if picked["key"] == (f"Key of {name}: {chatroom.show_fingerprint(key)} "
                             "(the host shows it: they must match)"):
            return picked
    raise AssertionError(f"could not pick {name}")


def test_host_keys_show_and_a_changed_key_is_accepted_only_by_its_button(x, tmp_path,
                                                                         procs):
    """The launcher lists each host's key, and shows more of it when the
    host is picked; the chat window's header shows it. The host, back with
    another key, is refused: the launcher says so with both keys, and its
    "Accept the new key" button joins."""
    name = unique("keys")
    first = Host(name, extra=["--state-dir", str(tmp_path / "key-a")])
    procs.append(first)
    old = next(e for e in first.lines if e.get("type") == "listening")["fingerprint"]
    gui = start_gui(x, tmp_path, procs, "--user", "alice")
    picked = _pick_host(gui, x, name, old)      # listed with its key, shown when picked
    gui.x.screenshot(tmp_path / "launcher-key.png", picked["xid"])
    gui.type_into("launcher", "room", "safe")
    chat = join_from_launcher(gui, x)
    assert chat["key"] == f"Encrypted · host key {chatroom.show_fingerprint(old)}"
    gui.x.screenshot(tmp_path / "chat-key.png", chat["xid"])
    mark = gui.mark()
    gui.click("chat", "leave")
    gui.phase("choosing", start=mark)

    first.stop()                            # the same name, another key (and port)
    second = Host(name, extra=["--state-dir", str(tmp_path / "key-b")])
    procs.append(second)
    new = next(e for e in second.lines if e.get("type") == "listening")["fingerprint"]
    _pick_host(gui, x, name, new)
    gui.type_into("launcher", "room", "safe")
    mark = gui.mark()
    gui.click("launcher", "join")
    status = gui.wait_for(lambda e: e.get("gui") == "launcher_status" and e["error"],
                          15, mark)
    assert "key has changed" in status["text"]
    gui.phase("choosing", start=mark)
    shown = gui.wait_for(lambda e: e.get("gui") == "window" and e["name"] == "launcher"
                         and e["key_box"], 10, mark)
    refused = gui.wait_for(lambda e: e.get("gui") == "event"
                           and e["event"]["type"] == "error", 10, mark)["event"]
    assert refused["code"] == "host_key_changed"
    assert (refused["old_fingerprint"], refused["fingerprint"]) == (old, new)
    gui.x.screenshot(tmp_path / "launcher-key-changed.png", shown["xid"])
    assert not [e for e in gui.lines[mark:] if e.get("gui") == "window"
                and e["name"] == "chat"]
    mark = gui.mark()
    gui.click("launcher", "accept_key")
    chat = gui.window("chat", start=mark)
    assert chat["key"] == f"Encrypted · host key {chatroom.show_fingerprint(new)}"
    accepted = gui.wait_for(lambda e: e.get("gui") == "event"
                            and e["event"]["type"] == "host_key", 10, mark)["event"]
    assert (accepted["status"], accepted["fingerprint"]) == ("accepted", new)
    gui.close("chat")
    assert_exits_cleanly(gui)


def test_decline_on_a_file_card_leaves_nothing_and_cancel_tells_the_sender(x, tmp_path,
                                                                            procs):
    """A file over the window's --ask-above waits on its card with Accept and
    Decline; Decline leaves nothing in the downloads folder and bob is told
    (file_failed declined). A file the window sends bob, who asks first,
    waits for him; Cancel on its card tells him (file_failed cancelled, by
    alice)."""
    host = Host(unique("answers"), advertise=False)
    procs.append(host)
    gui = start_gui(x, tmp_path, procs, "--server", f"{LOOPBACK}:{host.port}", "--room", "r",
                    "--user", "alice", "--ask-above", "1M")
    join_from_launcher(gui, x)
    bob = Cli(host.port, "r", "bob", downloads=tmp_path / "bob-downloads",
              extra=["--ask-above", "1M"])
    procs.append(bob)
    (tmp_path / "假期 photos.zip").write_bytes(os.urandom(3 * 1024 * 1024))
    bob.say(f"/send {tmp_path / '假期 photos.zip'}")

    asking = gui.wait_for(lambda e: e.get("gui") == "file_card" and e["state"] == "asking")
    assert asking["name"] == "假期 photos.zip" and asking["status"] == "Take this file?"
    assert set(asking["links"]) == {"file_accept", "file_decline"}, asking
    gui.painted(asking)
    x.screenshot(tmp_path / "file-card-asking.png")
    box = on_screen(asking, asking["links"]["file_decline"])
    x.click(box[0] + box[2] / 2, box[1] + box[3] / 2)
    told = bob.wait_for(lambda e: e.get("type") == "file_failed" and e.get("user") == "alice")
    assert told["code"] == "declined", told
    declined = gui.wait_for(lambda e: e.get("gui") == "file_card" and e["state"] == "failed")
    assert declined["status"] == "Declined by you" and not declined["links"], declined
    downloads = tmp_path / "gui-downloads"
    assert not downloads.exists() or os.listdir(downloads) == []

    # Accept brings the next one, verified.
    data = os.urandom(2 * 1024 * 1024)
    (tmp_path / "second.bin").write_bytes(data)
    mark = gui.mark()
    bob.say(f"/send {tmp_path / 'second.bin'}")
    asking = gui.wait_for(lambda e: e.get("gui") == "file_card" and e["state"] == "asking",
                          start=mark)
    gui.painted(asking)
    box = on_screen(asking, asking["links"]["file_accept"])
    x.click(box[0] + box[2] / 2, box[1] + box[3] / 2)
    done = gui.wait_for(lambda e: e.get("gui") == "file_card" and e["state"] == "done",
                        30, mark)
    assert Path(done["path"]).read_bytes() == data
    assert os.listdir(downloads) == ["second.bin"]

    # The other way: bob asks first, so alice's file waits for him, and her
    # card offers Cancel meanwhile.
    (tmp_path / "notes.bin").write_bytes(os.urandom(2 * 1024 * 1024))
    mark, bob_mark = gui.mark(), bob.mark()
    gui.type_into("chat", "input", f"/send {tmp_path / 'notes.bin'} @bob", enter=True)
    offer = bob.wait_for(lambda e: e.get("type") == "file_offer", start=bob_mark)
    assert offer["ask"] is True, offer
    card = gui.wait_for(lambda e: e.get("gui") == "file_card" and e["direction"] == "send"
                        and "file_cancel" in e["links"], start=mark)
    gui.painted(card)
    box = on_screen(card, card["links"]["file_cancel"])
    x.click(box[0] + box[2] / 2, box[1] + box[3] / 2)
    told = bob.wait_for(lambda e: e.get("type") == "file_failed", start=bob_mark)
    assert told["code"] == "cancelled" and told["by"] == "alice", told
    assert told["transfer"] == offer["transfer"], told
    cancelled = gui.wait_for(lambda e: e.get("gui") == "file_card" and e["direction"] == "send"
                             and e["state"] == "failed", start=mark)
    assert cancelled["status"] == "Cancelled by you", cancelled
    assert not (tmp_path / "bob-downloads").exists() or \
        os.listdir(tmp_path / "bob-downloads") == []
    gui.close("chat")
    assert_exits_cleanly(gui)


# --- the conversation: groups, dates, copying, links, pictures, new messages ----

def test_links_are_http_and_https_only_without_the_sentence_around_them():
    assert chatroom.find_links("see https://x.org/a_(b)). and (http://e.com/q?a=1, ok") == [
        (4, 23, "https://x.org/a_(b)"), (31, 49, "http://e.com/q?a=1")]
    assert chatroom.find_links("打开https://例子.com/路径。好") == [
        (2, 19, "https://例子.com/路径")]
    for text in ("javascript:alert(1)", "file:///etc/passwd", "ftp://x.org/", "https://",
                 "xhttps://x.org", "data:text/html,https"):
        assert chatroom.find_links(text) == [], text


def test_day_labels_say_today_yesterday_or_the_date():
    now = time.mktime((2026, 3, 4, 12, 0, 0, 0, 0, -1))
    at = [time.mktime((2026, 3, day, 9, 30, 0, 0, 0, -1)) for day in (4, 3, 1)]
    assert [chatroom.day_label(ts, now) for ts in at] == [
        "Today", "Yesterday", "Sunday 1 March"]
    assert chatroom.day_label(time.mktime((2025, 12, 31, 23, 0, 0, 0, 0, -1)), now) \
        == "31 December 2025"


def _picture(kind: str, width: int = 64, height: int = 48) -> bytes:
    """A gradient with a red square, encoded by OpenCV as `kind` ("png"...)."""
    import cv2
    import numpy
    image = numpy.zeros((height, width, 3), numpy.uint8)
    image[:, :, 0] = numpy.linspace(0, 255, width, dtype=numpy.uint8)[None, :]
    image[:, :, 1] = numpy.linspace(255, 0, height, dtype=numpy.uint8)[:, None]
    image[height // 4: height // 2, width // 4: width // 2] = (0, 0, 255)
    ok, data = cv2.imencode("." + kind, image)
    assert ok
    return data.tobytes()


@pytest.mark.parametrize("kind", ["png", "jpg", "gif", "bmp", "webp"])
def test_pictures_are_known_by_content_and_their_size_by_header(kind, tmp_path):
    data = _picture(kind, 640, 480)
    assert chatroom.picture_size(data) == (640, 480)
    path = tmp_path / "no-extension"                # by content, never by name
    path.write_bytes(data)
    width, height, ppm = chatroom.picture_thumbnail(path, 200, 200)
    assert (width, height) == (200, 150)
    assert ppm.startswith(b"P6 200 150 255\n") and len(ppm) == 15 + 200 * 150 * 3
    small = chatroom.picture_thumbnail(path, 2000, 2000)
    assert small is not None and small[:2] == (640, 480)     # never enlarged


def test_a_corrupt_or_huge_picture_gets_no_thumbnail(tmp_path):
    png = _picture("png")
    cases = {
        "text": b"just some text, named .png",
        "truncated": png[:40],
        "corrupt": png[:33] + os.urandom(len(png) - 33),
        # A bomb: a header that says 100000 x 100000, refused before decoding.
        "bomb": png[:16] + (100_000).to_bytes(4, "big") * 2 + png[24:],
    }
    for name, data in cases.items():
        (tmp_path / f"{name}.png").write_bytes(data)
        assert chatroom.picture_thumbnail(tmp_path / f"{name}.png", 100, 100) is None, name
    assert chatroom.picture_size(cases["bomb"]) == (100_000, 100_000)
    assert chatroom.picture_thumbnail(tmp_path / "missing.png", 100, 100) is None


def clipboard(x) -> str:
    """What the display's clipboard holds, read by a Tk of another process."""
    return subprocess.run(
        [sys.executable, "-c", "import tkinter; r = tkinter.Tk(); r.withdraw(); "
         "print(r.clipboard_get(), end='')"],
        env=x.env(), capture_output=True, text=True, timeout=20, check=True).stdout


def centre(box) -> tuple[float, float]:
    return box[0] + box[2] / 2, box[1] + box[3] / 2


def clear_of_midnight(margin_s: float = 120) -> None:
    """Wait until local midnight is more than `margin_s` away, if it is
    near: a test that says one day's divider must not see the date change."""
    t = time.localtime()
    to_midnight = (24 - t.tm_hour) * 3600 - t.tm_min * 60 - t.tm_sec
    if to_midnight < margin_s:
        time.sleep(to_midnight + 1)         # the clock is what we wait on here


def test_messages_group_by_sender_under_a_date_and_copy_and_links_work(x, tmp_path, procs):
    clear_of_midnight()
    host = Host(unique("group"), advertise=False, extra=["--rate-limit", "0"])
    procs.append(host)
    opened = tmp_path / "browser.txt"
    browser = tmp_path / "browser"
    browser.write_text(f"#!/bin/sh\necho \"$1\" >> {opened}\n")
    browser.chmod(0o755)
    gui = start_gui(x, tmp_path, procs, "--server", f"{LOOPBACK}:{host.port}", "--room", "r",
                    "--user", "alice", env={"BROWSER": str(browser)})
    chat = join_from_launcher(gui, x)
    bob = Cli(host.port, "r", "bob")
    procs.append(bob)
    gui.shown(lambda e: e["kind"] == "notice" and "bob entered" in e["text"])
    mark = gui.mark()
    count = 30
    for n in range(count):
        bob.say(f"line {n}")
    last = gui.shown(lambda e: e.get("text") == f"line {count - 1}", 20, mark)
    shown = [e for e in gui.lines[mark:] if e.get("gui") == "shown" and e["kind"] == "message"]
    # One name and avatar for the run: every message after the first is grouped.
    assert [e["grouped"] for e in shown] == [False] + [True] * (count - 1)
    days = [e for e in gui.lines if e.get("gui") == "shown" and e["kind"] == "day"]
    assert [e["text"] for e in days] == ["Today"]
    # How many messages fit in the view now (the README reports it).
    vx, vy, vw, vh = chat["elements"]["view"]
    oy = last["origin"][1]
    fit = sum(1 for e in shown if oy + e["top"] >= vy and oy + e["bottom"] <= vy + vh)
    print(f"\n{fit} one-line messages of one sender fit in the view ({vw} x {vh} px)")
    assert fit >= 11                 # 7 before grouping (the README)

    # Another sender starts a new group; a notice ends one too.
    gui.type_into("chat", "input", "mine, a reply", enter=True)
    reply = gui.shown(lambda e: e.get("text") == "mine, a reply")
    assert reply["grouped"] is False
    bob.say("bob again https://example.org/a_(b)?q=1 and more")
    linked = gui.shown(lambda e: e.get("text", "").startswith("bob again"))
    assert linked["grouped"] is False and "link0" in linked["links"]

    # A click on a bubble selects it whole; Ctrl+C copies it.
    gui.painted(linked)
    target = shown[-1]
    box = on_screen(linked, target["bbox"])
    mark = gui.mark()
    x.click(box[0] + 3, box[1] + box[3] / 2)
    assert gui.wait_for(lambda e: e.get("gui") == "selected", start=mark)["text"] \
        == f"line {count - 1}"
    x.key("ctrl+c")
    assert gui.wait_for(lambda e: e.get("gui") == "copied", start=mark)["text"] \
        == f"line {count - 1}"
    assert clipboard(x) == f"line {count - 1}"
    # A drag selects part of it: from its first letter to its middle.
    mark = gui.mark()
    left, middle = box[0] + 1, box[0] + box[2] // 2
    x.run("xdotool", "mousemove", str(left), str(round(box[1] + box[3] / 2)), "mousedown", "1",
          "mousemove", str(left + 4), str(round(box[1] + box[3] / 2)),
          "mousemove", str(middle), str(round(box[1] + box[3] / 2)), "mouseup", "1")
    x.key("ctrl+c")
    part = gui.wait_for(lambda e: e.get("gui") == "copied", start=mark)["text"]
    assert part and f"line {count - 1}".startswith(part) and part != f"line {count - 1}"
    assert clipboard(x) == part

    # A link opens in the browser with a click.
    link = on_screen(linked, linked["links"]["link0"])
    x.click(*centre(link))
    assert gui.wait_for(lambda e: e.get("gui") == "link_opened", start=mark)["url"] \
        == "https://example.org/a_(b)?q=1"
    deadline = time.monotonic() + 10
    while not opened.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert opened.read_text() == "https://example.org/a_(b)?q=1\n"

    # Right click on the link: Copy link puts the link on the clipboard...
    mark = gui.mark()
    x.run("xdotool", "mousemove", str(round(centre(link)[0])), str(round(centre(link)[1])),
          "click", "3")
    menu = gui.wait_for(lambda e: e.get("gui") == "menu", start=mark)["items"]
    assert list(menu) == ["Copy", "Copy link", "Open link"]
    x.click(*centre(menu["Copy link"]))
    assert gui.wait_for(lambda e: e.get("gui") == "copied", start=mark)["text"] \
        == "https://example.org/a_(b)?q=1"
    assert clipboard(x) == "https://example.org/a_(b)?q=1"
    # ... and Copy the bubble's text as it was written (our line breaks out).
    mark = gui.mark()
    x.run("xdotool", "mousemove", str(round(centre(link)[0])), str(round(centre(link)[1])),
          "click", "3")
    menu = gui.wait_for(lambda e: e.get("gui") == "menu", start=mark)["items"]
    x.click(*centre(menu["Copy"]))
    assert gui.wait_for(lambda e: e.get("gui") == "copied", start=mark)["text"] \
        == "bob again https://example.org/a_(b)?q=1 and more"
    gui.close("chat")
    assert_exits_cleanly(gui)


def test_a_received_picture_shows_as_a_thumbnail_that_opens(x, tmp_path, procs):
    host = Host(unique("picture"), advertise=False)
    procs.append(host)
    opened, env = opener_stub(tmp_path)
    gui = start_gui(x, tmp_path, procs, "--server", f"{LOOPBACK}:{host.port}", "--room", "r",
                    "--user", "alice", env=env)
    join_from_launcher(gui, x)
    bob = Cli(host.port, "r", "bob")
    procs.append(bob)
    # A picture named as no picture (by content, not name), and a "picture"
    # that isn't one (a PNG's name and first bytes, then noise).
    (tmp_path / "photo.dat").write_bytes(_picture("jpg", 800, 600))
    png = _picture("png")
    (tmp_path / "broken.png").write_bytes(png[:33] + os.urandom(4000))
    verdicts = {}
    for name in ("photo.dat", "broken.png"):
        bob.say(f"/send {tmp_path / name}")
        verdicts[name] = gui.wait_for(lambda e, n=name: e.get("gui") == "thumbnail"
                                      and e["name"] == n, 30)
    assert verdicts["broken.png"]["picture"] is False
    assert "thumb" not in verdicts["broken.png"]["links"]          # the ordinary card
    photo = verdicts["photo.dat"]
    assert photo["picture"] is True
    gui.painted(photo)
    # The view may have scrolled since: take the newest origin.
    now = [e for e in gui.lines if e.get("gui") == "thumbnail"][-1]
    box = on_screen(now, photo["links"]["thumb"])
    assert box[2] >= 100 and abs(box[2] / box[3] - 4 / 3) < 0.05, box
    width, height, pixels = x.pixels(box)
    colours = {pixels[i:i + 3] for i in range(0, len(pixels), 3)}
    assert len(colours) > 50, "the thumbnail is uniform: no picture drawn"
    assert (255, 0, 0) in {tuple(c) for c in colours} or any(
        c[0] > 200 and c[1] < 60 and c[2] < 60 for c in colours), "the red square is missing"
    x.click(*centre(box))
    deadline = time.monotonic() + 10
    while not opened.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert opened.read_text().splitlines() == [photo["path"]]
    gui.close("chat")
    assert_exits_cleanly(gui)


def test_new_messages_below_show_a_pill_and_history_a_divider(x, tmp_path, procs):
    host = Host(unique("unseen"), advertise=False, extra=["--rate-limit", "0"])
    procs.append(host)
    bob = Cli(host.port, "r", "bob")
    procs.append(bob)
    for n in range(25):
        bob.say(f"before {n}")
    bob.wait_for(lambda e: e.get("type") == "message" and e["text"] == "before 24")
    gui = start_gui(x, tmp_path, procs, "--server", f"{LOOPBACK}:{host.port}", "--room", "r",
                    "--user", "alice")
    chat = join_from_launcher(gui, x)
    gui.shown(lambda e: e.get("text") == "before 24")
    mark = gui.mark()
    bob.say("after you came")
    after = gui.shown(lambda e: e.get("text") == "after you came", start=mark)
    # Between what was said before you came and what is said now: a divider.
    kinds = [(e["kind"], e.get("text")) for e in gui.lines if e.get("gui") == "shown"]
    at = kinds.index(("message", "after you came"))
    assert kinds[at - 1] == ("divider", "New messages")
    assert kinds.index(("divider", "Earlier messages")) < kinds.index(("message", "before 0"))
    assert after["grouped"] is False        # a divider ends a group

    # Scrolled up, a new message doesn't move the view: a pill counts it.
    vx, vy, vw, vh = chat["elements"]["view"]
    x.run("xdotool", "mousemove", str(vx + vw // 2), str(vy + vh // 2),
          "click", "--repeat", "6", "4")
    mark = gui.mark()
    bob.say("while you read")
    bob.say("and another")
    pill = gui.wait_for(lambda e: e.get("gui") == "new_messages" and e["count"] == 2,
                        start=mark)
    x.click(*centre(pill["box"]))
    gui.wait_for(lambda e: e.get("gui") == "new_messages" and e["count"] == 0, start=mark)
    # At the bottom again, the next message is followed, with no pill.
    mark = gui.mark()
    bob.say("followed")
    gui.shown(lambda e: e.get("text") == "followed", start=mark)
    gui.type_into("chat", "input", "/who", enter=True)
    gui.shown(lambda e: e.get("text", "").startswith("In the room"), start=mark)
    assert not [e for e in gui.lines[mark:] if e.get("gui") == "new_messages"]
    gui.close("chat")
    assert_exits_cleanly(gui)


def test_emoji_draw_as_glyphs_and_the_picker_inserts_them(x, tmp_path, procs):
    host, gui, bob = window_and_cli(x, tmp_path, procs, "emoji", host_extra=["--rate-limit", "0"])
    # As for Chinese: the emoji's pixels must not be the box of a missing
    # glyph, which two different letters of a script no font here has share.
    texts = ["😀👍🎉🔥", "\u0f40" * 4, "\u0f41" * 4]
    for text in texts:
        bob.say(text)
    shown = {t: gui.shown(lambda e, t=t: e["kind"] == "message" and e["text"] == t)
             for t in texts}
    now = shown[texts[-1]]
    gui.painted(now)
    pixels = {t: x.pixels(on_screen(now, shown[t]["bbox"])) for t in texts}
    assert pixels[texts[1]] == pixels[texts[2]], "Tibetan has a font here: pick another"
    emoji = pixels[texts[0]][2]
    background = emoji[:3]
    assert sum(1 for i in range(0, len(emoji), 3) if emoji[i:i + 3] != background) > 100, \
        "nothing drawn where the emoji are"
    assert pixels[texts[0]] != pixels[texts[1]], \
        "emoji render as missing-glyph boxes: is fonts-noto-color-emoji installed?"
    # In colour (Tk 8.6.13 with Xft 2.3.6 draws Noto Color Emoji): 😀 is yellow.
    assert any(emoji[i] > 200 and emoji[i + 1] > 140 and emoji[i + 2] < 90
               for i in range(0, len(emoji), 3)), "emoji drawn, but not in colour"

    # The picker: a click on the button, a click on an emoji: it is typed in.
    mark = gui.mark()
    gui.type_into("chat", "input", "hi ")
    gui.click("chat", "emoji")
    items = gui.wait_for(lambda e: e.get("gui") == "emoji_picker", start=mark)["items"]
    x.click(*centre(items["😊"]))
    assert gui.wait_for(lambda e: e.get("gui") == "emoji_inserted", start=mark)["text"] \
        == "hi 😊"
    gui.click("chat", "send")
    assert bob.wait_for(lambda e: e.get("type") == "message" and e["from"] == "alice")[
        "text"] == "hi 😊"
    gui.close("chat")
    assert_exits_cleanly(gui)


_HISTORY_ACROSS_DAYS = """
import time, tkinter
import chatroom

def main(root):
    canvas = tkinter.Canvas(root, width=600, height=400)
    look = chatroom.Look(family="Noto Sans CJK SC", scaling=1.333, unit=1.0)
    view = chatroom.ChatView(canvas, look, chatroom.Images(), lambda *_: None,
                             chatroom.GuiTrace(False))
    # Noon today, not the time now: run near midnight, "a day ago plus
    # eleven minutes" would be today (the test once failed at 23:52).
    t = time.localtime()
    now, day = time.mktime((t.tm_year, t.tm_mon, t.tm_mday, 12, 0, 0, 0, 0, -1)), 24 * 3600
    def say(who, ts, history=True):
        view.add("message", **{"from": who, "text": "hi", "ts": ts, "mine": False,
                               "history": history})
    say("bob", now - 3 * day)
    say("bob", now - 3 * day + 60)              # a minute later: grouped
    say("bob", now - day)                       # another day: a divider first
    say("bob", now - day + 11 * 60)             # eleven minutes later: its own head
    say("carol", now - day + 11 * 60 + 5)       # another sender: its own head
    say("carol", now, history=False)            # today, said after we joined
    first, second = list(view.entries)[1:3]
    out = {"now": now,
           "shown": [[e.kind, e.data.get("text") if e.kind != "message" else e.data["from"],
                      e.grouped] for e in view.entries],
           "touching": second.top == first.bottom,
           "gap": canvas.bbox(second.tag)[1] - canvas.bbox(first.tag)[3],
           "ten": look.px(10)}
    view.close()
    return out
"""


def test_history_across_days_gets_date_dividers_and_a_pause_starts_a_new_group(x):
    """ChatView alone, in a child process on the session's Xvfb: the host
    stamps messages with its own clock, so days past are given here."""
    got = in_tk_child(x, _HISTORY_ACROSS_DAYS)
    assert got["shown"] == [
        ["day", chatroom.day_label(got["now"] - 3 * 24 * 3600), False],
        ["message", "bob", False], ["message", "bob", True], ["day", "Yesterday", False],
        ["message", "bob", False], ["message", "bob", False], ["message", "carol", False],
        ["day", "Today", False], ["divider", "New messages", False],
        ["message", "carol", False]]
    # The whole bubble of a grouped message sits closer to the one above.
    assert got["touching"] and got["gap"] < got["ten"], got
