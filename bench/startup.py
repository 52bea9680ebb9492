#!/usr/bin/env python3
"""bench/startup.py -- how big is the executable, and how fast does it start?

Builds dist/chatroom from build.spec (or takes --binary), then prints its
size, the median time to `--version`, and the median time from launch to the
launcher window being on screen (under an Xvfb this script starts), for the
executable and, measured in the same run, for `python chatroom.py` from
source, with the ratios. With --trims it also builds once without build.spec's
EXCLUDES and prints what they save; with --strip, once without its stripping of
debug symbols, and prints what that saves; with --livekit, once without livekit (no
echo cancelling) and prints what it costs: size, start-up, and the time the
first call's echo canceller takes to load (livekit is imported only then).

    python bench/startup.py
    python bench/startup.py --binary dist/chatroom --runs 7

Loopback only (the window browses mDNS on 127.0.0.1); every process it
starts, it stops.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from guidriver import Xvfb  # noqa: E402  (the tests' Xvfb helper)


def build(out: Path, spec: Path) -> Path:
    subprocess.run([sys.executable, "-m", "PyInstaller", str(spec), "--noconfirm",
                    "--distpath", str(out / "dist"), "--workpath", str(out / "build"),
                    "--log-level", "ERROR"], cwd=ROOT, check=True)
    return out / "dist" / ("chatroom.exe" if os.name == "nt" else "chatroom")


def build_variant(work: Path, name: str, edits: list[tuple[str, str]]) -> Path:
    """Build build.spec with each (old, new) of `edits` replaced in it: the
    executable without one of its trims or parts, to measure what that
    part costs or saves."""
    spec = (ROOT / "build.spec").read_text()
    for old, new in edits:
        if old not in spec:
            raise SystemExit(f"bench/startup.py: build.spec has no {old!r} any more")
        spec = spec.replace(old, new)
    variant = work / f"{name}.spec"
    variant.write_text(spec.replace("Path(SPECPATH)", f"Path({str(ROOT)!r})"))
    return build(work / name, variant)


def time_version(program: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([*program, "--version"], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def time_launcher(program: list[str], runs: int, x: Xvfb, config: Path) -> float:
    """Seconds from launch to the launcher's first layout (the window's trace
    hook reports it once Tk has mapped the window)."""
    times = []
    env = dict(x.env(), CHATROOM_GUI_TRACE="1", XDG_CONFIG_HOME=str(config))
    for _ in range(runs):
        started = time.perf_counter()
        proc = subprocess.Popen([*program, "--interface", "127.0.0.1"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            for line in proc.stdout:
                event = json.loads(line)
                if event.get("gui") == "window" and event.get("name") == "launcher":
                    times.append(time.perf_counter() - started)
                    break
        finally:
            proc.terminate()
            proc.wait(10)
    return statistics.median(times)


def time_echo_canceller(runs: int) -> float:
    """Median seconds a fresh Python takes to import livekit and build the
    echo canceller (what the first call pays, once), from source."""
    code = ("import time, chatroom; t = time.perf_counter(); chatroom.VoiceProcessor(); "
            "print(time.perf_counter() - t)")
    return round(statistics.median(
        float(subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout)
        for _ in range(runs)), 3)


def measure(program: list[str], runs: int, x: Xvfb, config: Path) -> dict:
    return {"version_s": round(time_version(program, runs), 3),
            "launcher_window_s": round(time_launcher(program, max(3, runs // 2), x, config), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", type=Path, help="an executable already built")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--trims", action="store_true",
                        help="also build without EXCLUDES and report the difference")
    parser.add_argument("--strip", action="store_true",
                        help="also build without stripping libraries and report the difference")
    parser.add_argument("--livekit", action="store_true",
                        help="also build without livekit and report what it costs")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="chatroom-startup-"))
    x = Xvfb(1280, 800).start()
    try:
        binary = args.binary or build(work / "trimmed", ROOT / "build.spec")
        result = {"executable_mib": round(binary.stat().st_size / 2 ** 20, 1)}
        exe = measure([str(binary)], args.runs, x, work / "config")
        source = measure([sys.executable, str(ROOT / "chatroom.py")], args.runs, x,
                         work / "config")
        result.update({f"executable_{k}": v for k, v in exe.items()})
        result.update({f"source_{k}": v for k, v in source.items()})
        result.update({f"ratio_{k}": round(exe[k] / source[k], 2) for k in exe})
        saving = [("untrimmed", "trims", [("excludes=EXCLUDES", "excludes=[]")])] \
            if args.trims else []
        saving += [("unstripped", "strip", [('a.binaries = strip_selected(a.binaries, '
                                             'Path(workpath) / "stripped")', "pass")])] \
            if args.strip else []
        for name, what, edits in saving:     # each without one trim: what it saves
            full = build_variant(work, name, edits)
            result[f"{name}_mib"] = round(full.stat().st_size / 2 ** 20, 1)
            result[f"{what}_save_mib"] = round(result[f"{name}_mib"]
                                               - result["executable_mib"], 1)
            result[f"{name}_version_s"] = round(time_version([str(full)], args.runs), 3)
        if args.livekit:
            without = build_variant(work, "no-livekit", [
                ('LIVEKIT = sorted(set(collect_dynamic_libs("livekit")))', "LIVEKIT = []"),
                ("excludes=EXCLUDES", 'excludes=EXCLUDES + ["livekit"]')])
            result["no_livekit_mib"] = round(without.stat().st_size / 2 ** 20, 1)
            result.update({f"no_livekit_{k}": v for k, v in
                           measure([str(without)], args.runs, x, work / "config").items()})
            result["echo_canceller_load_s"] = time_echo_canceller(args.runs)
        print(json.dumps(result))
    finally:
        x.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
