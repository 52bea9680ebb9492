"""The fuzz targets of tests/fuzz_targets.py, as tests.

- Every file of tests/fuzz-corpus/<target>/ goes through its target: the seeds
  (valid inputs made by chatroom's own encoders) and every crash the fuzzer
  ever found (`crash-*`), kept so that a bug fixed stays fixed. A crash file
  fails here until chatroom.py is fixed: never delete one to make CI green.
- Each target then runs under atheris for FUZZ_SECONDS (default 12) with the
  corpus as its seeds; a crash it finds is written to tests/fuzz-corpus/<target>/
  as crash-<sha1> (commit it) and fails the test with the input and traceback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fuzz_targets

CORPUS = fuzz_targets.CORPUS
SECONDS = int(os.environ.get("FUZZ_SECONDS", "12"))
CORPUS_FILES = sorted(p for target in fuzz_targets.TARGETS
                      for p in (CORPUS / target).glob("*") if p.is_file())


def test_every_target_has_seeds():
    for target in fuzz_targets.TARGETS:
        assert any((CORPUS / target).glob("seed-*")), target


def test_seeds_are_current():
    """The committed seeds are what `fuzz_targets.py --seed` writes today."""
    for target, inputs in fuzz_targets.seeds().items():
        committed = {p.read_bytes() for p in (CORPUS / target).glob("seed-*")}
        assert set(inputs) <= committed, f"run: python tests/fuzz_targets.py --seed ({target})"


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_corpus_replays(path: Path):
    fuzz_targets.TARGETS[path.parent.name](path.read_bytes())


@pytest.mark.parametrize("target", sorted(fuzz_targets.TARGETS))
def test_fuzz_for_a_while(target: str, tmp_path: Path):
    pytest.importorskip("atheris", reason="atheris has wheels for Linux x86_64 (and macOS)")
    if SECONDS <= 0:
        pytest.skip("FUZZ_SECONDS=0")
    work = tmp_path / "corpus"      # what the fuzzer finds, thrown away; the seeds stay
    work.mkdir()
    run = subprocess.run(
        [sys.executable, str(Path(fuzz_targets.__file__)), target,
         f"-max_total_time={SECONDS}", "-max_len=4096", "-rss_limit_mb=1024", "-timeout=10",
         f"-artifact_prefix={tmp_path}/", str(work), str(CORPUS / target)],
        capture_output=True, text=True, timeout=SECONDS + 120)
    saved = []
    for crash in sorted(tmp_path.glob("*-*")):
        if crash.is_file():
            kept = CORPUS / target / crash.name      # crash-, timeout- or oom-<sha1>
            shutil.copyfile(crash, kept)
            saved.append(kept)
    assert run.returncode == 0 and not saved, (
        f"the {target} fuzzer found a crash (exit {run.returncode}); kept as "
        f"{[str(p) for p in saved]}, replayed by test_corpus_replays from now on.\n"
        + run.stderr[-6000:])
