"""Write the Unicode tables of chatroom.py's NAMES AND TEXT section from Unicode's own data.

chatroom.py compares User and Room IDs by their UTS #39 confusable skeleton,
refuses IDs that mix scripts beyond UTS #39's "highly restrictive" level and
refuses invisible (default-ignorable) characters. Those rules need three
tables, which this script derives from Unicode's data files and writes into
chatroom.py from the `# --- Unicode tables` marker to the next section
banner (only that block changes; commit the result):

- confusables: prototype <- sources, from UTS #39's confusables.txt, kept
  only for sources an ID can hold after NFKC (letters, marks, numbers and
  " _-."), which is about a third of the file;
- scripts: Script_Extensions (or Script, where it has none) of every letter,
  mark and decimal digit, as ranges, from Scripts.txt and ScriptExtensions.txt;
- ignorable: Default_Ignorable_Code_Point, from DerivedCoreProperties.txt.

Inputs (Unicode, Inc.; Unicode License, see assets/THIRD-PARTY-NOTICES.txt):
- confusables.txt, version 14.0.0 (the Unicode version of Python 3.11's
  unicodedata): https://www.unicode.org/Public/security/14.0.0/confusables.txt
  (SHA-256 below; checked);
- Scripts.txt, ScriptExtensions.txt, DerivedCoreProperties.txt and
  PropertyValueAliases.txt of the UCD, as Debian's `unicode-data` package
  installs them in /usr/share/unicode (15.0.0 on Debian 12), or unzipped
  from https://www.unicode.org/Public/<version>/ucd/.

Run it with the Python that runs chatroom (its unicodedata decides which
characters are letters):

    .venv/bin/python tools/unicode_tables.py CONFUSABLES_TXT [UCD_DIR]
"""

from __future__ import annotations

import hashlib
import re
import sys
import unicodedata
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "chatroom.py"
CONFUSABLES_SHA256 = "f901938af166c3afa471bd10c224b0979cd024340f290649e16b29f779d48bfe"
WIDTH = 92                          # characters of table per source line


def records(path: Path):
    """(first, last, value) of each data line of a UCD-style file."""
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            fields = [f.strip() for f in line.split(";")]
            first, _, last = fields[0].partition("..")
            yield int(first, 16), int(last or first, 16), fields[1:]


def version_of(path: Path) -> str:
    head = path.read_text(encoding="utf-8-sig")[:2000]
    found = re.search(r"Version: (\d+\.\d+\.\d+)", head) or \
        re.search(r"-(\d+\.\d+\.\d+)\.txt", head)
    return found.group(1) if found else "?"


def id_char(ch: str) -> bool:
    """Could `ch` be in an ID once it is NFKC-normalised (see check_id)?"""
    return unicodedata.category(ch)[0] in "LMN" or ch in " _-."


def confusables(path: Path) -> dict[str, list[int]]:
    """prototype (hex code points joined by "+") -> its sources."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != CONFUSABLES_SHA256:
        sys.exit(f"{path}: SHA-256 {digest}, expected {CONFUSABLES_SHA256} (14.0.0)")
    groups: dict[str, list[int]] = defaultdict(list)
    for first, _last, (target, _kind, *_) in records(path):
        ch = chr(first)
        if id_char(ch) and unicodedata.normalize("NFD", unicodedata.normalize(
                "NFKC", ch)) == ch:
            groups["+".join(f"{int(h, 16):X}" for h in target.split())].append(first)
    return groups


def scripts(ucd: Path) -> list[tuple[int, int, str]]:
    """Ranges of letters, marks and digits with one Script_Extensions value
    ("Latn", "Deva+Dogr+Kthi+Mahj", ...); Common and Inherited are "Zyyy"
    and "Zinh". Ranges run on over code points no ID can hold."""
    short = {}
    for line in (ucd / "PropertyValueAliases.txt").read_text().splitlines():
        parts = [p.strip() for p in line.split("#", 1)[0].split(";")]
        if parts[0] == "sc" and len(parts) >= 3:
            short[parts[2]] = parts[1]
    value: dict[int, str] = {}
    for first, last, (name, *_) in records(ucd / "Scripts.txt"):
        for code in range(first, last + 1):
            value[code] = short[name]
    for first, last, (names, *_) in records(ucd / "ScriptExtensions.txt"):
        for code in range(first, last + 1):
            value[code] = "+".join(names.split())
    out: list[list] = []
    for code in range(0x110000):
        category = unicodedata.category(chr(code))
        if not (category[0] in "LM" or category == "Nd"):
            continue
        script = value.get(code, "Zzzz")
        if out and out[-1][2] == script:
            out[-1][1] = code
        else:
            out.append([code, code, script])
    return [(a, b, s) for a, b, s in out]


def ignorable(ucd: Path) -> list[tuple[int, int]]:
    return [(first, last) for first, last, (prop, *_) in
            records(ucd / "DerivedCoreProperties.txt")
            if prop == "Default_Ignorable_Code_Point"]


def span(first: int, last: int) -> str:
    return f"{first:X}" if first == last else f"{first:X}-{last:X}"


def keyed(key: str, values: list[str]) -> list[str]:
    """"key=v,v,..." items short enough for a line; a long list is cut into
    several items with the same key (the reader joins them again)."""
    items, chunk = [], []
    for value in values:
        if chunk and len(key) + 1 + len(",".join(chunk + [value])) > WIDTH:
            items.append(f"{key}={','.join(chunk)}")
            chunk = []
        chunk.append(value)
    return items + [f"{key}={','.join(chunk)}"]


def wrap(name: str, items: list[str]) -> list[str]:
    """`name = (` then string literals of space-separated items, then `)`."""
    lines, line = [f"{name} = ("], ""
    for item in items:
        if line and len(line) + 1 + len(item) > WIDTH:
            lines.append(f'    "{line} "')
            line = ""
        line = f"{line} {item}" if line else item
    lines.append(f'    "{line}"')
    lines.append(")")
    return lines


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        sys.exit(__doc__)
    conf_path = Path(argv[0])
    ucd = Path(argv[1] if len(argv) > 1 else "/usr/share/unicode")
    groups = confusables(conf_path)
    by_script: dict[str, list[str]] = defaultdict(list)
    for first, last, script in scripts(ucd):
        by_script[script].append(span(first, last))
    block = [
        "# --- Unicode tables ----------------------------------------------------------",
        "# Written by tools/unicode_tables.py from Unicode's own data (a subset, re-encoded;",
        "# don't edit by hand):",
        f"# UTS #39 confusables.txt {version_of(conf_path)}; Scripts.txt, ScriptExtensions.txt "
        f"and",
        f"# DerivedCoreProperties.txt {version_of(ucd / 'Scripts.txt')} (UCD). Data: Unicode, "
        "Inc., under",
        "# the Unicode License (assets/THIRD-PARTY-NOTICES.txt). Read by _unicode_tables().",
        f'UNICODE_DATA = "confusables {version_of(conf_path)}, scripts '
        f'{version_of(ucd / "Scripts.txt")}, Python {unicodedata.unidata_version}"',
        "# prototype=source,source,... (hex code points; a prototype of several joined by +)",
    ]
    block += wrap("_CONFUSABLE_TABLE", [
        item for target, sources in sorted(groups.items())
        for item in keyed(target, [f"{s:X}" for s in sorted(sources)])])
    block.append("# script(+script...)=range,range,... (Script_Extensions of letters, marks "
                 "and digits)")
    block += wrap("_SCRIPT_TABLE", [item for script, spans in sorted(by_script.items())
                                    for item in keyed(script, spans)])
    block.append("# Default_Ignorable_Code_Point ranges")
    block += wrap("_IGNORABLE_TABLE", [span(a, b) for a, b in ignorable(ucd)])
    block += ["", ""]
    source = TARGET.read_text(encoding="utf-8")
    start = source.index("# --- Unicode tables ---")
    end = source.index("\n# =====", start) + 1
    TARGET.write_text(source[:start] + "\n".join(block) + source[end:],
                      encoding="utf-8")
    print(f"wrote {len(block)} lines into {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
