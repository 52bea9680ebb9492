"""A PulseAudio server of a test's own, with null sinks for speakers and
their monitors for microphones: tests/test_voice.py's laptop on a table and
tests/test_gui_calls.py's headphones hint use it. Not a test module.

The server listens on a socket in a directory the test gives (no TCP, no
other client), is reached by chatroom through ALSA's pulse plugin (an ALSA
config of our own via ALSA_CONFIG_PATH), and is stopped by its PID. A
missing pulseaudio fails the test with the line that installs it: README.md's
test command and .ci/run install it, so a skip would hide a broken setup.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ALSA_PULSE = """pcm_type.pulse {{ lib "{pcm}" }}
ctl_type.pulse {{ lib "{ctl}" }}
pcm.!default {{ type pulse }}
ctl.!default {{ type pulse }}
"""
PULSE_SETUP = ("apt-get install pulseaudio pulseaudio-utils libasound2-plugins "
               "(README.md's test command does)")


@contextlib.contextmanager
def pulse_server(tmp_path: Path, sinks: tuple[str, ...] = ("laptop_a", "laptop_b")
                 ) -> Iterator[dict[str, str]]:
    """A PulseAudio server of our own (its socket under tmp_path, a null sink
    per name in `sinks`, 48 kHz mono) and the environment a client needs to
    use it through ALSA's pulse plugin. Stopped by its PID afterwards. Set
    PULSE_SINK=name and PULSE_SOURCE=name.monitor too, and what a client
    plays comes back into its microphone."""
    plugins = {kind: glob.glob(f"/usr/lib/*/alsa-lib/libasound_module_{kind}_pulse.so")
               for kind in ("pcm", "ctl")}
    missing = [tool for tool in ("pulseaudio", "pactl", "paplay") if shutil.which(tool) is None]
    if missing or not all(plugins.values()):
        pytest.fail(f"this test needs {missing or 'the ALSA pulse plugin'}: {PULSE_SETUP}",
                    pytrace=False)
    home = tmp_path / "pulse"
    home.mkdir()
    (home / "asound.conf").write_text(ALSA_PULSE.format(pcm=plugins["pcm"][0],
                                                        ctl=plugins["ctl"][0]))
    env = {"PULSE_SERVER": f"unix:{home}/native", "ALSA_CONFIG_PATH": str(home / "asound.conf"),
           "HOME": str(home), "XDG_RUNTIME_DIR": str(home), "XDG_CONFIG_HOME": str(home),
           "PULSE_STATE_PATH": str(home / "state"), "PULSE_RUNTIME_PATH": str(home / "run")}
    full = {**os.environ, **env}
    log = open(home / "pulseaudio.log", "wb")
    server = subprocess.Popen(
        ["pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1", "--realtime=no",
         "--use-pid-file=no", "--disable-shm=yes", "--log-target=stderr",
         "-L", f"module-native-protocol-unix auth-anonymous=1 socket={home}/native",
         *(arg for sink in sinks
           for arg in ("-L", f"module-null-sink sink_name={sink} rate=48000 channels=1"))],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=full)
    try:
        deadline = time.monotonic() + 30
        while not set(sinks) <= {line.split("\t")[1] for line in subprocess.run(
                ["pactl", "list", "short", "sinks"], env=full, capture_output=True,
                text=True).stdout.splitlines() if "\t" in line}:
            assert server.poll() is None, (home / "pulseaudio.log").read_text()
            assert time.monotonic() < deadline, "PulseAudio did not start in 30 s"
            time.sleep(0.1)                 # polling a server another process starts
        yield env
    finally:
        server.terminate()                  # by PID, through Popen
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        log.close()
