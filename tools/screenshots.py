#!/usr/bin/env python3
"""Screenshots of chatroom's windows for the README, made on a private Xvfb.

    python tools/screenshots.py [--out docs] [--scales 1 1.5]

For each scale it starts an Xvfb of its own (a free display number), two
hosts and a few terminal clients on 127.0.0.1, and the window; then it clicks
and types through the window with xdotool and saves, by window id:

    docs/launcher.png      the launcher, with hosts found on the network
    docs/chat.png          a room: Chinese and English bubbles, [SYSTEM]
                           notices, a file saved and one still arriving
    docs/launcher-150.png, docs/chat-150.png   the same at --scale 1.5
    docs/launcher-dark.png, docs/chat-dark.png the same in the dark theme
    docs/call.png          a call in the window, with the test-pattern camera
    docs/call-group.png    a four-person call's grid
    docs/call-speaking.png a call where both speak: each tile lit (a tone, a
                           WAV file of speech as the microphone)
    docs/file-ask.png      a file that waits for Accept or Decline, and one
                           its sender cancelled while it waited
    docs/conversation.png  a conversation: runs of messages under one name,
                           a date divider, a link with its right-click menu,
                           a picture's thumbnail, emoji
    docs/conversation-new.png  scrolled up: "↓ 2 new messages"

It also writes the program's icon to assets/icon.png (and assets/icon.ico
when ImageMagick's convert is there). Everything it starts, it stops by PID.
Needs: Xvfb, xdotool, ImageMagick (apt-get install xvfb xdotool imagemagick).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_gui_calls import (  # noqa: E402  (after the paths above)
    MEDIA,
    SPEECH,
    answer_from_the_bar,
    answer_from_the_card,
    call_window,
    frames_after,
    speaking,
)

import chatroom  # noqa: E402  (the paths above first)
from guidriver import Cli, Gui, Host, Xvfb  # noqa: E402


@contextlib.contextmanager
def stage(width: int = 1280, height: int = 800) -> Iterator[tuple[Xvfb, list, Path]]:
    """A private display, a list for what is started on it (stopped by PID
    after, newest first) and a scratch folder (removed after)."""
    x = Xvfb(width, height).start()
    started: list = []
    work = Path(tempfile.mkdtemp(prefix="chatroom-shots-"))
    try:
        yield x, started, work
    finally:
        for proc in reversed(started):
            proc.stop()
        x.stop()
        shutil.rmtree(work, ignore_errors=True)


def shoot(scale: float, out: Path, suffix: str, theme: str = "light") -> None:
    size = (1280, 800) if scale <= 1 else (round(1280 * scale), round(800 * scale))
    with stage(*size) as (x, started, work):
        lab = Host("Lab-PC")
        library = Host("Library", extra=["--state-dir", str(work / "library-host")])  # its own key
        started += [lab, library]
        # People already in rooms, so the launcher has something to show.
        for port, room, user in ((lab.port, "学习小组", "小明"), (lab.port, "lobby", "bob"),
                                 (library.port, "movie night", "carol")):
            started.append(Cli(port, room, user, downloads=work / user))
        # Let the hosts' mDNS records settle first (updates are debounced and
        # rate-limited): HostBrowser (DISCOVERY) can keep a stale record when
        # a resolve started before an update finishes after it.
        time.sleep(2)
        gui = Gui(x, work / "config", ["--room", "学习小组", "--user", "alice", "--scale",
                                       str(scale), "--downloads", str(work / "alice"),
                                       "--theme", theme,
                                       "--ask-above", "4G"])   # the 3 GiB file just comes
        started.append(gui)

        def launcher_shows_both(event: dict) -> bool:
            rooms = {r["name"]: r["rooms"] for r in event.get("rows", [])}
            return (event.get("gui") == "window" and event["name"] == "launcher"
                    and len(rooms.get("Lab-PC", [])) == 2 and len(rooms.get("Library", [])) == 1)

        gui.wait_for(launcher_shows_both, 20)
        deadline = time.monotonic() + 20
        while True:                         # mDNS updates trickle in: wait for a quiet second
            layout = gui.window("launcher")
            time.sleep(1)
            if launcher_shows_both(layout) and layout is gui.window("launcher"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the launcher never settled: {layout['rows']}")
        row = next(r for r in layout["rows"]        # the rooms come in any order
                   if r["name"] == "Lab-PC" and r["room"] == "学习小组")
        x.wait_viewable(layout["xid"])
        x.click(row["box"][0] + row["box"][2] / 3, row["box"][1] + row["box"][3] / 2)
        time.sleep(0.6)
        x.screenshot(out / f"launcher{suffix}.png", layout["xid"])

        gui.click("launcher", "join")
        gui.phase("chatting")
        xiaoming = next(p for p in started if isinstance(p, Cli) and p.ready["user"] == "小明")
        xiaoming.say("大家好！今天下午三点在图书馆开会，别忘了带笔记本。")
        gui.shown(lambda e: e.get("text", "").startswith("大家好"))
        gui.type_into("chat", "input", "Hi 小明! See you at three — 我会准时到。", enter=True)
        gui.shown(lambda e: e.get("mine") is True)
        notes = work / "课程笔记.pdf"
        notes.write_bytes(os.urandom(2_400_000))
        xiaoming.say(f"/send {notes}")
        gui.wait_for(lambda e: e.get("gui") == "file_card" and e["state"] == "done", 20)
        bob = Cli(lab.port, "学习小组", "bob", downloads=work / "bob2")
        started.append(bob)
        bob.say("Could someone share last week's slides? 谢谢！")
        gui.shown(lambda e: e.get("text", "").startswith("Could someone"))
        recording = work / "lecture-recording.mp4"
        with open(recording, "wb") as big:
            big.truncate(3 * 1024 ** 3)    # sparse: slow enough to catch in the middle
        bob.say(f"/send {recording}")
        gui.wait_for(lambda e: e.get("gui") == "file_card" and e["name"] == recording.name
                     and 25 < e["percent"] < 75, 60)
        time.sleep(0.3)
        x.screenshot(out / f"chat{suffix}.png", gui.window("chat")["xid"])
        mark = gui.mark()
        gui.close("chat")
        try:                                # the recording still moves: "Close anyway?"
            gui.wait_for(lambda e: e.get("gui") == "window" and e["name"] == "confirm", 5,
                         mark)
            gui.click("confirm", "yes")
        except AssertionError:
            pass                            # it had arrived: the window just closed
        gui.wait_exit(10)
    print(f"wrote {out / f'launcher{suffix}.png'} and {out / f'chat{suffix}.png'}")


def shoot_calls(out: Path) -> None:
    """Real calls: the window and three terminal clients, all with the
    test-pattern camera and the null audio device."""
    with stage() as (x, started, work):
        host = Host("Lab-PC", advertise=False)
        started.append(host)
        gui = Gui(x, work / "config", ["--server", f"127.0.0.1:{host.port}", "--room",
                                       "学习小组", "--user", "alice", "--downloads",
                                       str(work / "alice"), *MEDIA])
        started.append(gui)
        gui.window("launcher")
        gui.click("launcher", "join")
        gui.phase("chatting")
        others = []
        for user in ("小明", "bob", "carol"):
            cli = Cli(host.port, "学习小组", user, downloads=work / user, extra=MEDIA)
            started.append(cli)
            others.append(cli)
        xiaoming = others[0]
        xiaoming.say("/CHECK alice")
        answer_from_the_card(gui, x, "小明")
        layout = call_window(gui, {"alice", "小明"})
        frames_after(gui, "小明", 15, gui.mark())
        x.screenshot(out / "call.png", layout["xid"])
        for other in others[1:]:            # two more join through alice
            answer_from_the_bar(gui, x, other)
        layout = call_window(gui, {"alice", "小明", "bob", "carol"})
        for name in ("小明", "bob", "carol"):
            frames_after(gui, name, 15, gui.mark())
        x.screenshot(out / "call-group.png", layout["xid"])
        gui.close("call")
        gui.close("chat")
        gui.wait_exit(10)
    print(f"wrote {out / 'call.png'} and {out / 'call-group.png'}")


def shoot_speaking(out: Path) -> None:
    """A call where both speak: alice's microphone is a WAV file of speech,
    小明's a tone; the shot waits until both tiles are lit."""
    with stage() as (x, started, work):
        host = Host("Lab-PC", advertise=False)
        started.append(host)
        gui = Gui(x, work / "config", ["--server", f"127.0.0.1:{host.port}", "--room",
                                       "学习小组", "--user", "alice", "--downloads",
                                       str(work / "alice"), "--camera", "test", "--audio",
                                       str(SPEECH)])
        started.append(gui)
        gui.window("launcher")
        gui.click("launcher", "join")
        gui.phase("chatting")
        xiaoming = Cli(host.port, "学习小组", "小明", downloads=work / "xm",
                       extra=["--camera", "test", "--audio", "tone"])
        started.append(xiaoming)
        xiaoming.say("/CHECK alice")
        answer_from_the_card(gui, x, "小明")
        layout = call_window(gui, {"alice", "小明"})
        frames_after(gui, "小明", 15, gui.mark())
        speaking(gui, "小明", True)
        mark = gui.mark()               # alice's speech comes and goes: lit now?
        said = [e["speaking"] for e in gui.lines[:mark]
                if e.get("gui") == "tile_speaking" and e["name"] == "alice"]
        if not said or not said[-1]:
            speaking(gui, "alice", True, mark)
        x.screenshot(out / "call-speaking.png", layout["xid"])
        gui.close("call")
        gui.close("chat")
        gui.wait_exit(10)
    print(f"wrote {out / 'call-speaking.png'}")


def shoot_file_ask(out: Path) -> None:
    """The window asks above 1 MiB: carol's file, cancelled by her while it
    waited, then 小明's, waiting with Accept and Decline."""
    with stage() as (x, started, work):
        host = Host("Lab-PC", advertise=False)
        started.append(host)
        gui = Gui(x, work / "config", ["--server", f"127.0.0.1:{host.port}", "--room",
                                       "学习小组", "--user", "alice", "--downloads",
                                       str(work / "alice"), "--ask-above", "1M"])
        started.append(gui)
        gui.window("launcher")
        gui.click("launcher", "join")
        gui.phase("chatting")
        carol = Cli(host.port, "学习小组", "carol", downloads=work / "carol")
        started.append(carol)
        xiaoming = Cli(host.port, "学习小组", "小明", downloads=work / "xm")
        started.append(xiaoming)
        (work / "demo.mp4").write_bytes(os.urandom(3 * 1024 * 1024))
        (work / "假期照片.zip").write_bytes(os.urandom(5 * 1024 * 1024))
        carol.say(f"/send {work / 'demo.mp4'}")
        sent = carol.wait_for(lambda e: e.get("type") == "file_progress")
        gui.wait_for(lambda e: e.get("gui") == "file_card" and e["state"] == "asking")
        carol.say(f"/cancel {sent['transfer']}")
        gui.wait_for(lambda e: e.get("gui") == "file_card" and e["state"] == "failed")
        mark = gui.mark()
        xiaoming.say("这是上周的照片")
        xiaoming.say(f"/send {work / '假期照片.zip'}")
        asking = gui.wait_for(lambda e: e.get("gui") == "file_card" and e["state"] == "asking",
                              start=mark)
        gui.painted(asking)
        x.screenshot(out / "file-ask.png", gui.window("chat")["xid"])
        gui.close("chat")
        gui.wait_exit(10)
    print(f"wrote {out / 'file-ask.png'}")


def _sample_picture(path: Path) -> None:
    """A small landscape drawn with OpenCV, saved as a JPEG."""
    import cv2
    import numpy
    height, width = 360, 480
    sky = numpy.linspace((235, 190, 120), (250, 230, 200), height // 2).astype(numpy.uint8)
    image = numpy.zeros((height, width, 3), numpy.uint8)
    image[:height // 2] = sky[:, None, :]
    image[height // 2:] = (90, 160, 80)
    cv2.circle(image, (360, 90), 40, (80, 200, 250), -1, cv2.LINE_AA)
    hill = numpy.array([(0, 200), (140, 120), (300, 210), (480, 150), (480, 360), (0, 360)])
    cv2.fillPoly(image, [hill], (70, 130, 60), cv2.LINE_AA)
    cv2.imwrite(str(path), image)


def shoot_conversation(out: Path) -> None:
    """The conversation view: groups, a date divider, a link and its menu,
    a picture's thumbnail, emoji; then the new-messages pill."""
    with stage() as (x, started, work):
        host = Host("Lab-PC", advertise=False, extra=["--rate-limit", "0"])
        started.append(host)
        gui = Gui(x, work / "config", ["--server", f"127.0.0.1:{host.port}", "--room",
                                       "学习小组", "--user", "alice", "--downloads",
                                       str(work / "alice")])
        started.append(gui)
        gui.window("launcher")
        gui.click("launcher", "join")
        gui.phase("chatting")
        xiaoming = Cli(host.port, "学习小组", "小明", downloads=work / "xm")
        bob = Cli(host.port, "学习小组", "bob", downloads=work / "bob")
        started += [xiaoming, bob]
        lines = [(xiaoming, "大家好！今天下午三点在图书馆开会。"),
                 (xiaoming, "别忘了带笔记本 📒"),
                 (xiaoming, "我已经订好了房间 👍"),
                 (bob, "The whiteboard from last time:")]
        for who, text in lines:
            who.say(text)
            gui.shown(lambda e, t=text: e.get("text") == t)
        picture = work / "whiteboard.jpg"
        _sample_picture(picture)
        bob.say(f"/send {picture}")
        gui.wait_for(lambda e: e.get("gui") == "thumbnail" and e["picture"], 20)
        text = "and the slides: https://example.org/course/week-7 (PDF inside)"
        bob.say(text)
        gui.shown(lambda e: e.get("text") == text)
        for text in ("Thanks! 谢谢 🎉", "See you at three."):
            gui.type_into("chat", "input", text, enter=True)
            gui.shown(lambda e, t=text: e.get("text") == t)
        last = gui.shown(lambda e: e.get("text") == "See you at three.")
        link = next(e for e in gui.lines if e.get("gui") == "shown"
                    and e.get("text", "").startswith("and the slides"))
        gui.painted(last)
        ox, oy = last["origin"]
        x1, y1, x2, y2 = link["links"]["link0"]
        mark = gui.mark()
        x.run("xdotool", "mousemove", str(ox + (x1 + x2) // 2), str(oy + (y1 + y2) // 2),
              "click", "3")
        gui.wait_for(lambda e: e.get("gui") == "menu", start=mark)
        time.sleep(0.3)                     # the menu maps, then the shot
        layout = gui.window("chat")
        wx, wy, ww, wh = layout["box"]
        x.run("import", "-window", "root", "-crop", f"{ww}x{wh}+{wx}+{wy}", "+repage",
              str(out / "conversation.png"))
        x.key("Escape")
        view = layout["elements"]["view"]
        x.run("xdotool", "mousemove", str(view[0] + view[2] // 2), str(view[1] + view[3] // 2),
              "click", "--repeat", "4", "4")
        mark = gui.mark()
        xiaoming.say("房间是 302。")
        xiaoming.say("Room 302, second floor.")
        gui.wait_for(lambda e: e.get("gui") == "new_messages" and e["count"] == 2, start=mark)
        time.sleep(0.3)
        x.screenshot(out / "conversation-new.png", layout["xid"])
        gui.close("chat")
        gui.wait_exit(10)
    print(f"wrote {out / 'conversation.png'} and {out / 'conversation-new.png'}")


def write_icon(assets: Path) -> None:
    assets.mkdir(exist_ok=True)
    (assets / "icon.png").write_bytes(chatroom.app_icon_png(256))
    convert = "/usr/bin/convert"            # ImageMagick's, not another `convert` on PATH
    if Path(convert).exists():
        subprocess.run([convert, str(assets / "icon.png"), "-define",
                        "icon:auto-resize=256,64,48,32,16", str(assets / "icon.ico")],
                       check=True)
    print(f"wrote {assets / 'icon.png'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--scales", type=float, nargs="*", default=[1.0, 1.5])
    parser.add_argument("--no-calls", action="store_true", help="skip docs/call*.png")
    parser.add_argument("--only-conversation", action="store_true",
                        help="make docs/conversation*.png alone")
    parser.add_argument("--no-dark", action="store_true", help="skip docs/*-dark.png")
    args = parser.parse_args()
    args.out.mkdir(exist_ok=True)
    if args.only_conversation:
        shoot_conversation(args.out)
        return 0
    write_icon(ROOT / "assets")
    for scale in args.scales:
        shoot(scale, args.out, "" if scale == 1 else f"-{round(scale * 100)}")
    shoot_conversation(args.out)
    if not args.no_dark:
        shoot(1.0, args.out, "-dark", theme="dark")
    if not args.no_calls:
        shoot_calls(args.out)
        shoot_speaking(args.out)
    shoot_file_ask(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
