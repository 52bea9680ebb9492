"""The map of chatroom.py stays true (ARCHITECTURE.md, STYLE.md).

- The numbered section banners and the table of contents in the module
  docstring agree, number for number and title for title.
- Every banner opens a contract (comment lines that say what it owns), and
  no section grows past about 900 lines.
- A section uses only names defined in the sections above it (or in itself):
  an AST walk over every top-level definition, bodies and annotations
  included.
- Every error code the program can produce is one ERROR_CODES lists, and
  README.md documents every one of them.

No I/O beyond reading the two files; no imports of optional packages.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import chatroom

SOURCE_PATH = Path(chatroom.__file__)
SOURCE = SOURCE_PATH.read_text(encoding="utf-8")
LINES = SOURCE.split("\n")
TREE = ast.parse(SOURCE)
README = (SOURCE_PATH.parent / "README.md").read_text(encoding="utf-8")

BANNER_RE = re.compile(r"^# (\d+)\. ([A-Z][A-Z ]*[A-Z]): \S")
TOC_RE = re.compile(r"^\s*(\d+)\. ([A-Z][A-Z ]*[A-Z])\s{2,}\S")
MAX_SECTION_LINES = 900


def banners() -> list[tuple[int, int, str]]:
    """(line index, number, title) of every numbered banner, in order."""
    return [(index, int(m.group(1)), m.group(2)) for index, line in enumerate(LINES)
            if (m := BANNER_RE.match(line))]


def section_of(line_number: int) -> int:
    """The section number a (1-based) source line belongs to; 0 = before 1."""
    number = 0
    for index, section, _ in banners():
        if index + 1 <= line_number:
            number = section
    return number


def test_the_docstring_map_and_the_banners_agree():
    doc = ast.get_docstring(TREE) or ""
    toc = [(int(m.group(1)), m.group(2)) for line in doc.splitlines()
           if (m := TOC_RE.match(line))]
    found = [(number, title) for _, number, title in banners()]
    assert toc, "the module docstring has no numbered map"
    assert found == toc, f"banners {found} differ from the docstring's map {toc}"
    assert [number for number, _ in found] == list(range(1, len(found) + 1))


def test_every_banner_opens_with_a_rule_and_a_contract():
    for index, number, title in banners():
        assert LINES[index - 1].startswith("# ====") and \
            LINES[index + 1].startswith("# ===="), f"{number}. {title}: not a banner"
        contract = LINES[index + 2]
        assert contract.startswith("# ") and len(contract) > 10, \
            f"{number}. {title} has no contract paragraph under its banner"


def test_no_section_is_too_long_to_hold_in_mind():
    starts = [index for index, _, _ in banners()] + [len(LINES)]
    sizes = {f"{number}. {title}": end - start
             for (start, number, title), end in zip(banners(), starts[1:])}
    too_long = {name: size for name, size in sizes.items() if size > MAX_SECTION_LINES}
    assert not too_long, f"split these sections (STYLE.md): {too_long}"


def _defined_names(node: ast.stmt) -> set[str]:
    """The module-level names a top-level statement defines."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    targets: list[ast.expr] = []
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        targets = [node.target]
    names = set()
    for target in targets:
        for sub in ast.walk(target):
            if isinstance(sub, ast.Name):
                names.add(sub.id)
    return names


def _used_names(node: ast.stmt) -> set[str]:
    """Every name a top-level statement reads, in bodies and annotations."""
    return {sub.id for sub in ast.walk(node)
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load)}


def test_a_section_uses_only_the_sections_above_it():
    home: dict[str, int] = {}               # name -> section that defines it first
    for node in TREE.body:
        for name in _defined_names(node):
            home.setdefault(name, section_of(node.lineno))
    last = max(number for _, number, _ in banners())
    wrong = []
    for node in TREE.body:
        here = section_of(node.lineno)
        if here == last or isinstance(node, ast.If):    # main() and its __main__ guard
            continue
        for name in sorted(_used_names(node)):
            there = home.get(name)
            if there is not None and there > here:
                wrong.append(f"line {node.lineno} (section {here}) uses {name} "
                             f"from section {there}")
    assert not wrong, "\n".join(wrong)


def test_the_walk_would_notice_a_name_from_below():
    # The rule's own check: a use from a later section is caught.
    home = {"later": 5}
    node = ast.parse("def early():\n    return later()\n").body[0]
    assert [name for name in _used_names(node) if home.get(name, 0) > 2] == ["later"]


# --- error codes ----------------------------------------------------------------

# Calls whose argument at this position (or keyword `code`) is an error code.
_CODE_ARGUMENT = {"Error": 0, "Refused": 0, "ChatError": 0, "RemoteError": 0,
                  "LocalError": 0, "ProtocolError": 0, "FileAbort": 1, "FileRefuse": 1,
                  "Mistyped": 1, "_error": 0, "refuse": 0, "fail": 0,
                  "_fail_download": 1, "_file_failed": 1}


def _codes_in_source() -> set[str]:
    codes = set()
    for node in ast.walk(TREE):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else \
                func.attr if isinstance(func, ast.Attribute) else ""
            position = _CODE_ARGUMENT.get(name)
            values = [kw.value for kw in node.keywords if kw.arg == "code"]
            if position is not None and len(node.args) > position:
                values.append(node.args[position])
            codes |= {v.value for v in values
                      if isinstance(v, ast.Constant) and isinstance(v.value, str)}
        elif isinstance(node, ast.Dict):
            pairs = dict(zip(node.keys, node.values))
            for key, value in pairs.items():
                if isinstance(key, ast.Constant) and key.value == "code" and \
                        isinstance(value, ast.Constant) and isinstance(value.value, str):
                    codes.add(value.value)
    return codes


def test_every_error_code_in_the_program_is_a_known_one():
    codes = _codes_in_source()
    assert {"user_taken", "file_too_large", "unknown_command"} <= codes   # the walk works
    assert codes <= chatroom.ERROR_CODES, sorted(codes - chatroom.ERROR_CODES)


def test_the_readme_documents_every_error_code():
    missing = sorted(code for code in chatroom.ERROR_CODES if f"`{code}`" not in README)
    assert not missing, f"README.md does not document: {missing}"


def test_an_undocumented_error_code_is_refused_even_under_python_O():
    with pytest.raises(ValueError):
        chatroom.ChatError("not_a_code", "a bug")


def test_every_runtime_requirement_has_its_notice():
    """assets/THIRD-PARTY-NOTICES.txt ships inside the executable: every
    package requirements.txt pins must be in it (tools/notices.py writes it)."""
    notices = (SOURCE_PATH.parent / "assets" / "THIRD-PARTY-NOTICES.txt").read_text(
        encoding="utf-8")
    requirements = (SOURCE_PATH.parent / "requirements.txt").read_text(encoding="utf-8")
    pinned = [line.split("==")[0].strip() for line in requirements.splitlines()
              if "==" in line and not line.startswith("#")]
    assert pinned and all(f"- {name} " in notices for name in pinned), \
        [name for name in pinned if f"- {name} " not in notices]
    assert (SOURCE_PATH.parent / "LICENSE").read_text().startswith(
        "                    GNU GENERAL PUBLIC LICENSE")
