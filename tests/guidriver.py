"""Drive chatroom's desktop window from tests and tools, on 127.0.0.1 only.

- `Xvfb`: a private X display on a free number, stopped by its PID.
- `Gui`: `chatroom.py` with no mode, run with CHATROOM_GUI_TRACE=1 so it prints
  what it does as JSON lines (windows and where their buttons are, events
  handled, what it drew); driven like a person would with xdotool (clicks,
  typing) and closed like a window manager would (WM_DELETE_WINDOW);
  `drop_files` drops files on it as tkdnd would (Tk's `send`).
- `Host` and `Cli`: `--host --json` and `--cli --json` beside it.

Every process here is started by us and stopped by its PID, never by name.
Not a test module: tests/test_gui.py, tests/test_gui_look.py,
tests/test_binary.py and tools/screenshots.py import it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "chatroom.py"
LOOPBACK = "127.0.0.1"
# How long a host may take to listen and a terminal client to be ready: a
# failure deadline, never a speed promise (as conftest's DEFAULT_TIMEOUT).
# The one-file executable unpacks 365 MB at each start; at a load of 11 on
# 2 cores its host took over the 15 s this used to be.
START_DEADLINE_S = 30.0

# Processes started here keep what they keep (a host's key, pinned keys,
# places) in a folder of this run's, never in the config folder of the
# person running the tests; a Gui gets one of its own.
_CONFIG_HOME = tempfile.mkdtemp(prefix="chatroom-gui-config-")


def end_process(proc: subprocess.Popen) -> None:
    """Terminate a process we started if it still runs; kill it after 5 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Xvfb:
    """An X server of our own: `Xvfb :N -screen 0 WxHx24 -nolisten tcp`."""

    def __init__(self, width: int = 1280, height: int = 800) -> None:
        self.size = (width, height)
        self.proc: subprocess.Popen | None = None
        self.display = ""

    def start(self) -> Xvfb:
        """Start it on a display number it picks itself (-displayfd: it
        writes the number once it accepts connections), so two runs at once
        can never both believe one display is theirs. Picking a number here
        and waiting for its socket did: the loser of a race saw the winner's
        socket, and lost its display when the winner stopped."""
        read_end, write_end = os.pipe()
        try:
            proc = subprocess.Popen(
                ["Xvfb", "-displayfd", str(write_end), "-screen", "0",
                 f"{self.size[0]}x{self.size[1]}x24", "-nolisten", "tcp"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(write_end,))
        finally:
            os.close(write_end)
        with os.fdopen(read_end, "rb") as numbers:
            ready, _, _ = select.select([numbers], [], [], START_DEADLINE_S)
            line = numbers.readline() if ready else b""
        if not line.strip().isdigit():
            end_process(proc)
            raise RuntimeError("Xvfb did not start (is it installed? apt-get install xvfb)")
        self.proc, self.display = proc, f":{int(line)}"
        return self

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc)

    def env(self) -> dict[str, str]:
        return dict(os.environ, DISPLAY=self.display)

    def run(self, *argv: str, input: bytes | None = None) -> bytes:
        """Run an X tool (xdotool, import) on this display; its stdout."""
        return subprocess.run(argv, env=self.env(), input=input, check=True,
                              capture_output=True, timeout=20).stdout

    def click(self, x: float, y: float) -> None:
        """Point, then click: Tk buttons fire only for a pointer that
        entered them, so come from one pixel aside."""
        x, y = round(x), round(y)
        self.run("xdotool", "mousemove", str(x - 1), str(y), "sleep", "0.05",
                 "mousemove", str(x), str(y), "sleep", "0.05", "click", "1")

    def double_click(self, x: float, y: float) -> None:
        self.run("xdotool", "mousemove", str(round(x)), str(round(y)), "click",
                 "--repeat", "2", "--delay", "80", "1")

    def type(self, text: str) -> None:
        self.run("xdotool", "type", "--delay", "15", text)

    def key(self, *keys: str) -> None:
        self.run("xdotool", "key", *keys)

    def find_window(self, title: str, timeout: float = 5) -> tuple[int, int, int, int, int]:
        """(id, x, y, width, height) of the window called `title`, once shown."""
        deadline = time.monotonic() + timeout
        while True:
            found = subprocess.run(["xdotool", "search", "--onlyvisible", "--name", title],
                                   env=self.env(), capture_output=True).stdout.split()
            if found:
                xid = int(found[-1])
                geometry = self.run("xdotool", "getwindowgeometry", str(xid)).decode()
                numbers = [int(n) for n in
                           geometry.replace(",", " ").replace("x", " ").split() if n.isdigit()]
                return xid, numbers[0], numbers[1], numbers[-2], numbers[-1]
            if time.monotonic() > deadline:
                raise AssertionError(f"no window called {title!r}")
            time.sleep(0.1)

    def screenshot(self, path: Path, xid: int | None = None) -> None:
        """A PNG of one window (by X id) or of the whole screen."""
        self.run("import", "-window", str(xid) if xid else "root", str(path))

    def pixels(self, box: tuple[int, int, int, int]) -> tuple[int, int, bytes]:
        """(width, height, RGB bytes) of the screen in box = (x, y, w, h)."""
        x, y, w, h = box
        data = self.run("import", "-window", "root", "-crop", f"{w}x{h}+{x}+{y}", "+repage",
                        "-depth", "8", "ppm:-")
        magic, width, height, maxval, pixels = data.split(maxsplit=4)
        assert magic == b"P6" and maxval == b"255", data[:20]
        return int(width), int(height), pixels

    def look_away(self) -> None:
        """What a person does by clicking another program: the pointer
        leaves our windows and the keyboard focus goes with it. Xvfb has no
        other program, nor a window manager, to give the focus to: it goes
        back to following the pointer (X's PointerRoot), here onto the root
        window. Moving the pointer alone is not enough: once Tk has set the
        focus on one of its windows, that window keeps it."""
        self.run("xdotool", "mousemove", "0", "0")
        with _XDisplay(self.display) as (x11, display):
            x11.XSetInputFocus(display, 1, 1, 0)    # PointerRoot, RevertToPointerRoot, now
            x11.XFlush(display)

    def close_window(self, xid: int) -> None:
        """What a window manager does when you click a window's X: send it a
        WM_DELETE_WINDOW client message (Xvfb has no window manager)."""
        with _XDisplay(self.display) as (x11, display):
            event = _ClientMessage(type=33, window=xid, format=32,       # 33: ClientMessage
                                   message_type=x11.XInternAtom(display, b"WM_PROTOCOLS", 0))
            event.data[0] = x11.XInternAtom(display, b"WM_DELETE_WINDOW", 0)
            x11.XSendEvent(display, xid, 0, 0, ctypes.byref(event))
            x11.XFlush(display)

    def wait_viewable(self, xid: int, timeout: float = 5) -> None:
        """Wait until the window is mapped and on screen: a click sent before
        that would land on the root window and be lost."""
        deadline = time.monotonic() + timeout
        while True:
            with _XDisplay(self.display) as (x11, display):
                attributes = _WindowAttributes()
                if x11.XGetWindowAttributes(display, xid, ctypes.byref(attributes)) and \
                        attributes.map_state == 2:                          # IsViewable
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"window {xid:#x} never became viewable")
            time.sleep(0.05)


class _ClientMessage(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("serial", ctypes.c_ulong),
                ("send_event", ctypes.c_int), ("display", ctypes.c_void_p),
                ("window", ctypes.c_ulong), ("message_type", ctypes.c_ulong),
                ("format", ctypes.c_int), ("data", ctypes.c_long * 5),
                ("pad", ctypes.c_long * 12)]            # an XEvent is 24 longs


class _WindowAttributes(ctypes.Structure):             # Xlib's XWindowAttributes
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("width", ctypes.c_int),
                ("height", ctypes.c_int), ("border_width", ctypes.c_int),
                ("depth", ctypes.c_int), ("visual", ctypes.c_void_p),
                ("root", ctypes.c_ulong), ("class_", ctypes.c_int),
                ("bit_gravity", ctypes.c_int), ("win_gravity", ctypes.c_int),
                ("backing_store", ctypes.c_int), ("backing_planes", ctypes.c_ulong),
                ("backing_pixel", ctypes.c_ulong), ("save_under", ctypes.c_int),
                ("colormap", ctypes.c_ulong), ("map_installed", ctypes.c_int),
                ("map_state", ctypes.c_int), ("all_event_masks", ctypes.c_long),
                ("your_event_mask", ctypes.c_long), ("do_not_propagate_mask", ctypes.c_long),
                ("override_redirect", ctypes.c_int), ("screen", ctypes.c_void_p)]


class _XDisplay:
    """libX11 through ctypes (it comes with Tk): `with _XDisplay(":5") as (x11, d)`."""

    def __init__(self, name: str) -> None:
        self.name = name
        x11 = self.x11 = ctypes.CDLL(ctypes.util.find_library("X11"))
        x11.XOpenDisplay.restype = ctypes.c_void_p
        x11.XOpenDisplay.argtypes = [ctypes.c_char_p]
        x11.XInternAtom.restype = ctypes.c_ulong
        x11.XInternAtom.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
        x11.XSendEvent.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int,
                                   ctypes.c_long, ctypes.c_void_p]
        x11.XGetWindowAttributes.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p]
        x11.XSetInputFocus.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int,
                                       ctypes.c_ulong]
        x11.XFlush.argtypes = x11.XCloseDisplay.argtypes = [ctypes.c_void_p]

    def __enter__(self):
        self.display = self.x11.XOpenDisplay(self.name.encode())
        assert self.display, f"can't open display {self.name}"
        return self.x11, self.display

    def __exit__(self, *exc) -> None:
        self.x11.XCloseDisplay(self.display)


class Proc:
    """A chatroom process whose stdout is JSON lines, read as they come."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None,
                 stdin: bool = False, program: list[str] | None = None) -> None:
        self.argv = (program or [sys.executable, str(SCRIPT)]) + argv
        if env is None:
            env = dict(os.environ)
            env.setdefault("XDG_CONFIG_HOME", _CONFIG_HOME)
        self.proc = subprocess.Popen(self.argv, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE,
                                     stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)
        self.lines: list[dict] = []         # every JSON line so far
        self.stamps: list[float] = []       # when each arrived (time.monotonic)
        self.stderr: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        for raw in self.proc.stdout:
            try:
                item = json.loads(raw)
            except ValueError:
                item = {"raw": raw.decode("utf-8", "replace")}
            with self._changed:
                self.lines.append(item)
                self.stamps.append(time.monotonic())
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _read_stderr(self) -> None:
        for raw in self.proc.stderr:
            self.stderr.append(raw.decode("utf-8", "replace"))

    def wait_for(self, match: Callable[[dict], bool], timeout: float = 10,
                 start: int = 0) -> dict:
        """The first line from index `start` on that `match`es; waits for it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            index = start
            while True:
                while index < len(self.lines):
                    if match(self.lines[index]):
                        return self.lines[index]
                    index += 1
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and index >= len(self.lines)):
                    raise AssertionError(
                        f"no matching line within {timeout} s from {self.argv[2:]}; last "
                        f"lines: {self.lines[-5:]}; stderr: {''.join(self.stderr)[-2000:]}")
                self._changed.wait(min(left, 0.2))

    def mark(self) -> int:
        """The index of the next line (for wait_for(start=...))."""
        with self._changed:
            return len(self.lines)

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """End the process if it still runs (terminate, then kill), by PID."""
        end_process(self.proc)


class Host(Proc):
    """`--host --json` on 127.0.0.1, any free port; `port` once listening."""

    def __init__(self, name: str, advertise: bool = True, extra: list[str] = (),
                 program: list[str] | None = None) -> None:
        super().__init__(["--host", "--json", "--port", "0", "--interface", LOOPBACK,
                          "--name", name] + ([] if advertise else ["--no-advertise"])
                         + list(extra), program=program)
        self.name = name
        try:
            self.port = self.wait_for(lambda e: e.get("type") == "listening",
                                      START_DEADLINE_S)["port"]
        except BaseException:           # the caller never gets it to stop: stop it here
            self.stop()
            raise


class Cli(Proc):
    """`--cli --json` joined to a host on 127.0.0.1; `say()` types a line."""

    def __init__(self, port: int, room: str, user: str, downloads: Path | None = None,
                 program: list[str] | None = None, extra: list[str] = ()) -> None:
        super().__init__(["--cli", "--json", "--server", f"{LOOPBACK}:{port}", "--room", room,
                          "--user", user] + (["--downloads", str(downloads)] if downloads
                                             else []) + list(extra),
                         stdin=True, program=program)
        self.user = user
        try:
            self.ready = self.wait_for(lambda e: e.get("type") in ("ready", "closed"),
                                       START_DEADLINE_S)
        except BaseException:           # as Host's
            self.stop()
            raise

    def say(self, line: str) -> None:
        self.proc.stdin.write((line + "\n").encode("utf-8"))
        self.proc.stdin.flush()

    def quit(self) -> int:
        self.say("/quit")
        return self.wait_exit(10)


class Gui(Proc):
    """The desktop window with its trace hook, on display `x`."""

    def __init__(self, x: Xvfb, config: Path, args: list[str] = (),
                 env: dict[str, str] | None = None, program: list[str] | None = None) -> None:
        environment = dict(x.env(), CHATROOM_GUI_TRACE="1", XDG_CONFIG_HOME=str(config),
                           **(env or {}))
        super().__init__(["--interface", LOOPBACK] + list(args), env=environment,
                         program=program)
        self.x = x

    def window(self, name: str, timeout: float = 15, start: int = 0) -> dict:
        """The latest layout the trace gave for window `name` ("launcher", "chat")."""
        self.wait_for(lambda e: e.get("gui") == "window" and e["name"] == name, timeout, start)
        with self._changed:
            return [e for e in self.lines if e.get("gui") == "window" and e["name"] == name][-1]

    def phase(self, phase: str, timeout: float = 10, start: int = 0) -> dict:
        return self.wait_for(lambda e: e.get("gui") == "phase" and e["phase"] == phase,
                             timeout, start)

    def click(self, window: str, element: str) -> None:
        layout = self.window(window)
        self.x.wait_viewable(layout["xid"])
        x, y, w, h = layout["elements"][element]
        self.x.click(x + w / 2, y + h / 2)

    def type_into(self, window: str, element: str, text: str, enter: bool = False) -> None:
        self.click(window, element)
        self.x.key("ctrl+slash", "BackSpace")   # Tk entries: select all, delete it
        if text:
            self.x.type(text)
        if enter:
            self.x.key("Return")

    def close(self, window: str) -> None:
        self.x.close_window(self.window(window)["xid"])

    def shown(self, match: Callable[[dict], bool], timeout: float = 10, start: int = 0) -> dict:
        return self.wait_for(lambda e: e.get("gui") == "shown" and match(e), timeout, start)

    def painted(self, record: dict, timeout: float = 10) -> dict:
        """Wait until the window says it has painted everything it drew up
        to `record` (a line of its trace), and the X server has it: read
        pixels after this, never after a sleep."""
        with self._changed:
            index = next(i for i, line in enumerate(self.lines) if line is record)
        return self.wait_for(lambda e: e.get("gui") == "painted", timeout, index + 1)


def on_screen(record: dict, bbox: list[int]) -> tuple[int, int, int, int]:
    """A canvas bbox as a screen box, with the view origin of `record`."""
    ox, oy = record["origin"]
    return bbox[0] + ox, bbox[1] + oy, bbox[2] - bbox[0], bbox[3] - bbox[1]


def in_tk_child(x: Xvfb, source: str, *args: str, timeout: float = 60.0) -> Any:
    """Run `source` in a child Python on display `x` and return what its
    `main(root, *args)` returns (JSON). `root` is a withdrawn Tk. The test
    process itself never holds an X connection: when a display it knew went
    away, Xlib's I/O error handler would end the whole pytest run with
    exit status 1 and no word (it did, mid-suite)."""
    runner = (source + "\n\nimport json, sys, tkinter\n"
              "root = tkinter.Tk()\nroot.withdraw()\n"
              "try:\n    result = main(root, *sys.argv[1:])\n"
              "finally:\n    root.destroy()\n"
              "print(json.dumps(result))\n")
    done = subprocess.run([sys.executable, "-c", runner, *args], env=dict(
        x.env(), PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")])),
        capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"the Tk child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


_DROP = """
def main(root, interp, window, x, y, *paths):
    data = " ".join("{" + path + "}" for path in paths)     # a Tcl list (no braces in them)
    root.tk.call("send", interp, "; ".join([
        f"tkdnd::generic::HandleEnter {window} 0x1 text/uri-list text/uri-list copy {{}}",
        f"tkdnd::generic::SetDroppedData [list {data}]",
        f"tkdnd::generic::HandlePosition {window} {{}} {{}} {x} {y} copy",
        f"tkdnd::generic::HandleDrop {window} {{}} {{}} {x} {y} 0"]))
"""


def drop_files(x: Xvfb, interp: str, window: str, point: tuple[int, int],
               paths: list[str]) -> None:
    """Drop `paths` on `window` (a Tk path) of the Tk interpreter `interp`
    (both from the window's "drops" trace line) at `point` (screen
    coordinates), as tkdnd's X11 code does when an XDND drop arrives: its
    generic enter, position and drop steps, from a made-up source window
    (0x1), with the data already read. Xvfb has no file manager to drag
    from; Tk's `send` (X properties on display `x`) carries the script to
    the window's process, whether that runs chatroom.py or the executable."""
    in_tk_child(x, _DROP, interp, window, str(point[0]), str(point[1]), *paths)


_SHRINK = """
def main(root, interp, toplevel):
    root.tk.call("send", interp, f"wm geometry {toplevel} 1x1")
    return [int(n) for n in str(root.tk.call("send", interp, f"wm minsize {toplevel}")).split()]
"""


def shrink_to_minimum(x: Xvfb, layout: dict) -> list[int]:
    """Make a window as small as it lets itself be, as a person dragging
    its corner would (Xvfb has no window manager to drag with): Tk's own
    `wm geometry 1x1`, sent to the window's process with Tk's `send`
    (`interp` and `toplevel` come from its "window" trace line), which Tk
    clamps to the window's minimum size. Returns that [width, height]."""
    return in_tk_child(x, _SHRINK, layout["interp"], layout["toplevel"])


def ink(pixels: bytes) -> int:
    """How many pixels are dark (text on a light bubble)."""
    return sum(1 for i in range(0, len(pixels), 3)
               if pixels[i] + pixels[i + 1] + pixels[i + 2] < 3 * 128)
