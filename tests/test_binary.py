"""The packaged executable, tested as built (issue: ship it).

A session fixture builds `dist/chatroom` from build.spec with PyInstaller
into a temporary folder (or takes the one named by $CHATROOM_BINARY), and
every test here runs that executable, never chatroom.py: --version and
--help, a host and two terminal clients chatting on loopback, discovery on
127.0.0.1 finding the host, a file crossing, calls, and test_voice.py's
laptop on a table (echo cancelling from inside it). Under Xvfb: the
launcher and the chat window, a file dropped on that window (tkdnd from
inside it), and the window working on without drops when tkdnd won't load.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from pulse import pulse_server
from test_voice import laptop_on_a_table

from conftest import LOOPBACK, ChatProcess, Client, HostProcess

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT_S = 900
# The build runs inside the first test that needs it: pytest-timeout's
# 180 s (pyproject) would end it on a busy machine.
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_S + 300)


@pytest.fixture(scope="session")
def binary(tmp_path_factory) -> Path:
    """The executable under test: $CHATROOM_BINARY, or a fresh build."""
    given = os.environ.get("CHATROOM_BINARY")
    if given:
        return Path(given).resolve()
    out = tmp_path_factory.mktemp("pyinstaller")
    build = subprocess.run(
        [sys.executable, "-m", "PyInstaller", str(ROOT / "build.spec"), "--noconfirm",
         "--distpath", str(out / "dist"), "--workpath", str(out / "build"),
         "--log-level", "WARN"],
        cwd=ROOT, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert build.returncode == 0, build.stderr[-4000:]
    path = out / "dist" / ("chatroom.exe" if os.name == "nt" else "chatroom")
    assert path.is_file(), f"no executable in {out / 'dist'}"
    return path


def run(binary: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *args], capture_output=True, text=True,
                          timeout=timeout)


def test_version_and_help(binary):
    version = run(binary, "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("chatroom "), version.stdout
    assert "protocol" in version.stdout
    usage = run(binary, "--help")
    assert usage.returncode == 0, usage.stderr
    for flag in ("--host", "--cli", "--discover", "--version", "--json", "--interface"):
        assert flag in usage.stdout, flag


@pytest.fixture
def processes():
    started = []
    yield started
    for process in started:
        process.cleanup()


def test_host_and_two_clients_chat(binary, processes):
    program = [str(binary)]
    host = HostProcess(program=program)
    processes.append(host)
    assert host.listening["encrypted"] is True      # the executable bundles ssl
    alice = Client(host.port, "大厅", "alice", "--retry-for", "0", program=program)
    processes.append(alice)
    assert alice.wait_for("ready")["encrypted"] is True
    bob = Client(host.port, "大厅", "bob", program=program)
    processes.append(bob)
    assert bob.wait_for("ready")["members"] == ["alice", "bob"]
    alice.send("你好 from the executable")
    got = bob.wait_for(lambda e: e["type"] == "message" and e["from"] == "alice")
    assert got["text"] == "你好 from the executable"
    bob.send("help")
    assert "/CHECK" in bob.wait_for("help")["text"]
    bob.close_stdin()
    assert bob.wait() == 0
    assert alice.wait_for(lambda e: e["type"] == "system" and e["event"] == "leave")
    assert host.stop() == 0
    assert alice.wait_for("closed")["reason"] == "host_shutdown"


def test_discovery_finds_the_host(binary, processes):
    """A host advertised on 127.0.0.1 is found by --discover and joined by a
    --cli that was given no --server."""
    name = f"binary-{uuid.uuid4().hex[:8]}"
    program = [str(binary)]
    host = ChatProcess(["--host", "--json", "--port", "0", "--interface", LOOPBACK,
                        "--name", name], program=program, label="host")
    processes.append(host)
    listening = host.wait_for("listening", timeout=30)
    assert listening["advertised"] is True
    found = run(binary, "--discover", "--json", "--interface", LOOPBACK, "--timeout", "3",
                "--name", name)
    assert found.returncode == 0, found.stderr
    hosts = [json.loads(line) for line in found.stdout.splitlines()]
    assert [(h["type"], h["name"], h["address"], h["port"]) for h in hosts] == \
        [("host", name, LOOPBACK, listening["port"])]
    joiner = ChatProcess(["--cli", "--json", "--interface", LOOPBACK, "--name", name,
                          "--room", "r", "--user", "u"], program=program, label="joiner")
    processes.append(joiner)
    assert joiner.wait_for("ready", timeout=30)["port"] == listening["port"]


def test_a_file_crosses(binary, processes, tmp_path):
    program = [str(binary)]
    host = HostProcess(program=program)
    processes.append(host)
    sender = Client(host.port, "files", "alice", "--downloads", str(tmp_path / "a"),
                    program=program)
    processes.append(sender)
    sender.wait_for("ready")
    receiver = Client(host.port, "files", "bob", "--downloads", str(tmp_path / "b"),
                      program=program)
    processes.append(receiver)
    receiver.wait_for("ready")
    source = tmp_path / "报告 final.bin"
    data = os.urandom(3 * 1024 * 1024 + 17)
    source.write_bytes(data)
    sender.send(f"/send {source}")
    got = receiver.wait_for("file_received", timeout=60)
    assert got["sha256"] == hashlib.sha256(data).hexdigest()
    assert Path(got["path"]).read_bytes() == data
    assert Path(got["path"]).parent == tmp_path / "b"
    assert sender.wait_for("file_sent")["size"] == len(data)


def test_a_call_with_video_and_sound(binary, processes, tmp_path):
    """The executable carries calls: numpy, OpenCV, PyAV (VP8, and the libopus
    in its wheel), PortAudio and livekit's echo canceller all load from
    inside it."""
    program = [str(binary)]
    host = HostProcess(program=program)
    processes.append(host)
    media = ("--camera", "test", "--audio", "tone")
    alice = Client(host.port, "r", "alice", *media, program=program)
    processes.append(alice)
    alice.wait_for("ready")
    bob = Client(host.port, "r", "bob", *media, "--record", str(tmp_path / "rec"),
                 program=program)
    processes.append(bob)
    bob.wait_for("ready")
    alice.send("/CHECK bob")
    bob.wait_for("call_invite")
    bob.send("/CHECK alice")
    connected = alice.wait_for("call_connected", timeout=30)
    assert (connected["codec"], connected["audio"]) == ("vp8", "opus"), connected
    bob.wait_for(lambda e: e["type"] == "media_stats" and e["video_fps"] > 5
                 and e["audio_frames"] > 10, timeout=30)
    notices = run(binary, "--notices")      # shipped inside the executable
    assert notices.returncode == 0, notices.stderr
    assert "GNU General Public License" in notices.stdout
    for bundled in ("PySimpleGUI", "av 18", "FFmpeg", "libx264", "opencv", "numpy", "livekit",
                    "GNU LESSER GENERAL PUBLIC LICENSE"):
        assert bundled in notices.stdout, bundled
    devices = run(binary, "--list-devices", "--json")
    assert devices.returncode == 0 and devices.stderr == "", devices.stderr
    # livekit's native library is inside, loads, and runs a frame each way.
    assert json.loads(devices.stdout)["echo_cancel"] == {"works": True, "why": ""}, \
        devices.stdout
    # ... and so are the codecs: VP8 and Opus, not only the fallbacks.
    assert json.loads(devices.stdout)["video_codecs"] == ["vp8", "jpeg"], devices.stdout
    assert json.loads(devices.stdout)["audio_codecs"] == ["opus", "pcm"], devices.stdout
    assert not [e for e in alice.seen() + bob.seen() if e["type"] == "error"]


@pytest.fixture
def pulse(tmp_path):
    with pulse_server(tmp_path) as env:
        yield env


def test_a_laptop_call_cancels_its_echo_inside_the_executable(binary, pulse, join, tmp_path,
                                                             monkeypatch, processes):
    """tests/test_voice.py's laptop on a table, every process the executable:
    the echo canceller works in a call from inside it, not only loads."""
    program = [str(binary)]
    host = HostProcess(program=program)
    processes.append(host)
    laptop_on_a_table(pulse, host.port, join, tmp_path, monkeypatch, program=program)


def test_the_launcher_opens_and_a_person_joins_from_it(binary, tmp_path):
    """Double-click equivalent: the executable with no mode opens the
    launcher; our host (advertised on 127.0.0.1) appears in its list; a
    person clicks it, types a Room ID and a User ID, presses Join, and the
    chat window shows a Chinese message from a terminal client, in pixels."""
    from guidriver import Cli, Gui, Host, Xvfb, ink, on_screen
    program = [str(binary)]
    name = f"binary-gui-{uuid.uuid4().hex[:8]}"
    x = Xvfb(1280, 800).start()
    started = []
    try:
        host = Host(name, program=program)
        started.append(host)
        gui = Gui(x, tmp_path / "config", ["--downloads", str(tmp_path / "gui"), "--camera",
                                           "test", "--audio", "null"], program=program)
        started.append(gui)
        listed = gui.wait_for(lambda e: e.get("gui") == "window" and e["name"] == "launcher"
                              and any(r["name"] == name and r["box"] for r in e["rows"]), 30)
        x.screenshot(tmp_path / "launcher.png", listed["xid"])
        x.wait_viewable(listed["xid"])
        for _ in range(3):      # other hosts on 127.0.0.1 can move rows under the pointer
            row = next(r for r in listed["rows"] if r["name"] == name)
            mark = gui.mark()
            x.click(row["box"][0] + row["box"][2] / 2, row["box"][1] + row["box"][3] / 2)
            listed = gui.wait_for(lambda e: e.get("gui") == "window" and e["name"] == "launcher"
                                  and e["fields"]["address"]
                                  and any(r["name"] == name and r["box"] for r in e["rows"]),
                                  15, mark)
            if listed["fields"]["address"].endswith(f":{host.port}"):
                break
        else:
            pytest.fail(f"clicking our host's row filled in {listed['fields']['address']}")
        gui.type_into("launcher", "room", "大厅")
        gui.type_into("launcher", "user", "alice")
        gui.click("launcher", "join")
        gui.phase("chatting", 20)
        bob = Cli(host.port, "大厅", "bob", program=program)
        started.append(bob)
        assert bob.ready["members"] == ["alice", "bob"]
        bob.say("你好, from the executable")
        bubble = gui.shown(lambda e: e["kind"] == "message"
                           and e["text"] == "你好, from the executable", 15)
        assert bubble["from"] == "bob"
        gui.painted(bubble)
        chat = gui.window("chat")
        x.screenshot(tmp_path / "chat.png", chat["xid"])
        _, _, pixels = x.pixels(on_screen(bubble, bubble["bbox"]))
        assert ink(pixels) > 100, "no text drawn where the message bubble is"
        assert (tmp_path / "launcher.png").stat().st_size > 5000
        # A call from the executable's window: bob calls, alice calls back
        # from the card, and the call window shows bob's video.
        caller = Cli(host.port, "大厅", "carol", program=program,
                     extra=["--camera", "test", "--audio", "null"])
        started.append(caller)
        mark = gui.mark()
        caller.say("/CHECK alice")
        card = gui.wait_for(lambda e: e.get("gui") == "call_card" and e["state"] == "ringing",
                            15, mark)
        gui.painted(card)
        link = on_screen(card, card["links"]["callback"])
        x.click(link[0] + link[2] / 2, link[1] + link[3] / 2)
        gui.wait_for(lambda e: e.get("gui") == "tile_frame" and e["name"] == "carol", 30, mark)
        gui.close("call")
        caller.wait_for(lambda e: e.get("type") == "call_ended", 15)
        gui.close("chat")
        assert gui.wait_exit(15) == 0
    finally:
        for process in started:
            process.stop()
        x.stop()


@pytest.fixture
def desktop(tmp_path):
    """An Xvfb of this test's and a list of the guidriver processes it
    starts; all stopped at the end, by PID."""
    from guidriver import Xvfb
    x = Xvfb(1280, 800).start()
    started: list = []
    yield x, started
    for process in started:
        process.stop()
    x.stop()


def _chatting(binary: Path, desktop, tmp_path: Path, env: dict[str, str] | None = None):
    """A host, and the executable's window joined to it as alice from the
    launcher (fields filled by flags): (host, gui, chat window layout)."""
    from guidriver import Gui, Host
    x, started = desktop
    program = [str(binary)]
    host = Host(f"binary-drop-{uuid.uuid4().hex[:8]}", advertise=False, program=program)
    started.append(host)
    gui = Gui(x, tmp_path / "config", ["--downloads", str(tmp_path / "gui"),
                                       "--server", f"{LOOPBACK}:{host.port}", "--room", "r",
                                       "--user", "alice"], env=env, program=program)
    started.append(gui)
    gui.window("launcher", 30)              # the one-file executable unpacks first
    gui.click("launcher", "join")
    gui.phase("chatting", 20)
    return host, gui, gui.window("chat")


def test_a_file_dropped_on_the_executables_window_is_sent(binary, desktop, tmp_path):
    """tkinterdnd2 and its tkdnd library for this system are inside the
    executable and load into its Tk: a file dropped on the chat window
    (tkdnd's enter, position and drop steps, through Tk's `send`, as
    tests/test_gui_look.py does from source) reaches the room."""
    from guidriver import Cli, drop_files
    x, started = desktop
    host, gui, chat = _chatting(binary, desktop, tmp_path)
    drops = gui.wait_for(lambda e: e.get("gui") == "drops")
    bob = Cli(host.port, "r", "bob", downloads=tmp_path / "bob", program=[str(binary)])
    started.append(bob)
    source = tmp_path / "拖放 dropped.txt"
    source.write_text("dropped on the executable 拖放")
    vx, vy, vw, vh = chat["elements"]["view"]
    mark = gui.mark()
    drop_files(x, drops["interp"], drops["window"], (vx + vw // 2, vy + vh // 2), [str(source)])
    assert gui.wait_for(lambda e: e.get("gui") == "dropped", start=mark)["paths"] == [str(source)]
    got = bob.wait_for(lambda e: e.get("type") == "file_received", 30)
    assert got["from"] == "alice"
    assert Path(got["path"]).read_text() == "dropped on the executable 拖放"
    gui.close("chat")
    assert gui.wait_exit(15) == 0
    assert "Traceback" not in "".join(gui.stderr), "".join(gui.stderr)[-3000:]


def test_the_executables_window_works_on_when_tkdnd_wont_load(binary, desktop, tmp_path):
    """tkdnd that won't load inside the executable costs drops only: a log
    line says why, and the window chats and sends files with /send. tkdnd's
    own loader is made to fail: its pkgIndex.tcl reads TKDND_DEBUG_LEVEL
    and `package require tkdnd` errors on a value that is not a number, as
    it would for a library that can't be loaded."""
    from guidriver import Cli
    x, started = desktop
    host, gui, chat = _chatting(binary, desktop, tmp_path, env={"TKDND_DEBUG_LEVEL": "broken"})
    bob = Cli(host.port, "r", "bob", downloads=tmp_path / "bob", program=[str(binary)])
    started.append(bob)
    bob.say("still chatting")
    gui.shown(lambda e: e["kind"] == "message" and e["text"] == "still chatting", 15)
    source = tmp_path / "sent.txt"
    source.write_text("sent without drag and drop")
    gui.type_into("chat", "input", f"/send {source}", enter=True)
    got = bob.wait_for(lambda e: e.get("type") == "file_received", 30)
    assert Path(got["path"]).read_text() == "sent without drag and drop"
    assert not [e for e in gui.lines if e.get("gui") == "drops"]
    log = "".join(gui.stderr)               # written as the chat window opened
    assert "files can't be dropped on the window: Unable to load tkdnd library." in log, log
    gui.close("chat")
    assert gui.wait_exit(15) == 0
    assert "Traceback" not in "".join(gui.stderr), "".join(gui.stderr)[-3000:]
