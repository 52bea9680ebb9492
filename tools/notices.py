"""Write assets/THIRD-PARTY-NOTICES.txt: what the executable bundles, under
which licence, with each licence's text.

The executable (build.spec) carries Python, Tcl/Tk and every package of
requirements.txt with the native libraries their wheels vendor. This lists
them with their versions (read from the installed distributions), names the
licence of each, and appends the licence texts: those the wheels ship in
their metadata, and the GNU licences (from Debian's /usr/share/common-licenses)
that FFmpeg's GPL build in PyAV's wheel, x264, x265, zeroconf and
PySimpleGUI need, and the Unicode licence of the tables in chatroom.py
(from Debian's unicode-data package). Run it after changing
requirements.txt, in the project's venv, and commit the result:

    .venv/bin/python tools/notices.py
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "assets" / "THIRD-PARTY-NOTICES.txt"
COMMON = Path("/usr/share/common-licenses")

# (distribution, what it brings, licence) for everything the executable bundles.
BUNDLED = [
    ("zeroconf", "mDNS discovery", "LGPL-2.1-or-later"),
    ("ifaddr", "network addresses (zeroconf's)", "MIT"),
    ("PySimpleGUI", "the desktop window", "LGPL-3.0-or-later"),
    ("cryptography", "AES-GCM and X25519 for calls; bundles OpenSSL", "Apache-2.0 OR BSD-3-Clause"
     " (OpenSSL: Apache-2.0)"),
    ("cffi", "cryptography's C bindings", "MIT"),
    ("numpy", "frames and samples; bundles OpenBLAS and the gfortran runtime",
     "BSD-3-Clause AND others (OpenBLAS: BSD-3-Clause; libgfortran: GPL-3.0 with the GCC "
     "Runtime Library Exception)"),
    ("opencv-python-headless", "cameras, video files, JPEG; bundles FFmpeg (LGPL build), "
     "OpenBLAS, libvpx, libaom and others", "Apache-2.0 (third-party parts below)"),
    ("av", "PyAV: VP8 and the libopus calls use; bundles FFmpeg built with GPL parts "
     "(libx264, libx265), libvpx, libopus, dav1d, SVT-AV1, LAME, GnuTLS, Nettle, GMP",
     "BSD-3-Clause; the bundled FFmpeg as a whole: GPL-2.0-or-later"),
    ("PyAudio", "microphones and speakers; with PortAudio", "MIT (PortAudio: MIT-style)"),
    ("livekit", "echo cancelling, noise suppression and gain: WebRTC's audio processing in "
     "livekit's native library, which bundles WebRTC and its parts (abseil, BoringSSL, "
     "FFmpeg, libvpx, libaom, dav1d, openh264, opus, rnnoise, ...: its LICENSE.md, below)",
     "Apache-2.0 (WebRTC: BSD-3-Clause; the bundled parts: each its own, below)"),
    ("protobuf", "livekit's messages to its native library", "BSD-3-Clause"),
    ("tkinterdnd2", "files dropped on the window; bundles George Petasis' tkdnd for the "
     "platform built on", "MIT (tkdnd: its own BSD-style terms, below)"),
]
PLATFORM = [
    ("Python", sys.version.split()[0], "PSF-2.0"),
    ("Tcl/Tk", "8.6", "TCL (BSD-style)"),
]
GNU_TEXTS = ["GPL-2", "LGPL-2.1", "LGPL-3"]     # GPL-3 is the project's own: LICENSE
# Data inside chatroom.py itself: the Unicode tables of its NAMES AND TEXT section
# (tools/unicode_tables.py), with the licence Debian's unicode-data ships.
UNICODE_DATA = ("Unicode data: UTS #39 confusables.txt 14.0.0; Scripts.txt, "
                "ScriptExtensions.txt, DerivedCoreProperties.txt 15.0.0. Modified: a subset, "
                "re-encoded as tables in chatroom.py (tools/unicode_tables.py) for the "
                "look-alike and script rules of IDs. Licence: Unicode-DFS-2016 (Unicode, Inc. "
                "License Agreement - Data Files and Software)")
UNICODE_COPYRIGHT = Path("/usr/share/doc/unicode-data/copyright")


def licence_files(distribution: str) -> list[Path]:
    """The licence texts a distribution installed with it."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return []
    found = []
    for file in dist.files or []:
        name = file.name.upper()
        if (name.startswith(("LICENSE", "LICENCE", "COPYING", "NOTICE"))
                or "/licenses/" in str(file)) and not name.endswith((".PY", ".PYC")):
            path = Path(file.locate())
            if path.is_file():
                found.append(path)
    return sorted(set(found))


def tkdnd_terms() -> str:
    """tkdnd's licence: the terms at the head of its tkdnd.tcl (it ships no
    licence file), from the folder of any platform in tkinterdnd2's wheel."""
    try:
        dist = importlib.metadata.distribution("tkinterdnd2")
    except importlib.metadata.PackageNotFoundError:
        return ""
    for file in dist.files or []:
        if file.name == "tkdnd.tcl":
            head = []
            for line in Path(file.locate()).read_text(encoding="utf-8").splitlines():
                if not line.startswith("#"):
                    break
                head.append(line.lstrip("#")[1:] if line.startswith("# ") else "")
            return "\n".join(head).strip()
    return ""


def main() -> int:
    lines = ["Third-party software in the chatroom executable",
             "================================================", "",
             "chatroom itself is under the GNU General Public License, version 3 or later",
             "(LICENSE). The executable bundles the software below; each keeps its own",
             "licence, whose text follows. PyAV's wheel carries an FFmpeg built with GPL",
             "parts (libx264, libx265), which is why the whole is distributed under the",
             "GPL.", "",
             "Where the source is, at exactly the versions listed: chatroom's own is",
             "the chatroom.py this was built from (--version names it). Each package's",
             "source release is at https://pypi.org/project/NAME/VERSION/#files (the",
             "line under each entry); the FFmpeg build inside PyAV's wheel, with the",
             "scripts that configure it, at https://github.com/PyAV-Org/pyav-ffmpeg",
             "(its release for the av version listed); Python at",
             "https://www.python.org/downloads/source/ and Tcl/Tk at",
             "https://www.tcl.tk/software/tcltk/download.html.", ""]
    for name, version, licence in PLATFORM:
        lines.append(f"- {name} {version}: {licence}")
    for name, what, licence in BUNDLED:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "(not installed when this was written)"
        lines.append(f"- {name} {version}: {what}. Licence: {licence}")
        if not version.startswith("("):
            lines.append(f"  source: https://pypi.org/project/{name}/{version}/#files")
    lines.append(f"- {UNICODE_DATA}")
    seen: set[str] = set()                  # a wheel may ship one text twice
    for name, _what, _licence in BUNDLED:
        for path in licence_files(name):
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            if text not in seen:
                seen.add(text)
                lines += ["", "", f"===== {name}: {path.name} =====", "", text]
    if terms := tkdnd_terms():
        lines += ["", "", "===== tkinterdnd2: tkdnd (tkdnd.tcl) =====", "", terms]
    if UNICODE_COPYRIGHT.is_file():         # apt-get install unicode-data
        text = UNICODE_COPYRIGHT.read_text(encoding="utf-8", errors="replace")
        start = text.find("UNICODE, INC. LICENSE AGREEMENT")
        if start >= 0:
            lines += ["", "", "===== Unicode data: Unicode, Inc. License Agreement =====",
                      "", text[start:].strip()]
    for name in GNU_TEXTS:
        path = COMMON / name
        if path.is_file():
            lines += ["", "", f"===== {name} (GNU) =====", "", path.read_text().strip()]
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
