"""Files that carry on after a drop (issue 13): a connection cut in the
middle of a file, either way, resumes from the bytes already received
instead of starting over or failing. Driven as a person or a script would:
a host, clients with --cli --json, and a FaultProxy (tests/faults.py) that
slows one client's connection down and cuts it mid-file. All on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading

import pytest
from faults import FaultProxy

MiB = 1 << 20


@pytest.fixture
def faulty():
    made: list[FaultProxy] = []

    def make(port: int, rate: int = 0) -> FaultProxy:
        made.append(FaultProxy(port))
        made[-1].rate = rate
        return made[-1]
    yield make
    for proxy in made:
        proxy.close()


def make_file(path, size: int, seed: int) -> str:
    """A file of `size` random bytes; returns its SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def of(client, kind: str) -> list[dict]:
    return [e for e in client.seen() if e.get("type") == kind]


def cut_after(client, proxy, direction: str, at_least: int) -> None:
    """Cut `proxy` once `client` reports `at_least` bytes of its file moving."""
    client.wait_for(lambda e: e.get("type") == "file_progress" and
                    e["direction"] == direction and e["bytes"] >= at_least, timeout=60)
    proxy.cut()


def test_a_download_cut_in_the_middle_resumes_where_it_was(start_host, join, faulty,
                                                          tmp_path):
    host = start_host("--grace", "60")
    proxy = faulty(host.port, rate=4 * MiB)     # bob's network: slow enough to cut in time
    alice = join(host.port, "R", "alice", "--downloads", str(tmp_path / "dl-alice"))
    bob = join(proxy.port, "R", "bob", "--downloads", str(tmp_path / "dl-bob"))
    alice.wait_for(lambda e: e.get("type") == "system" and e["user"] == "bob")
    source = tmp_path / "src" / "big.bin"
    digest = make_file(source, 24 * MiB, 1)
    alice.send(f"/send {source}")
    cut_after(bob, proxy, "receive", 4 * MiB)
    proxy.rate = 0
    back = bob.wait_for("resumed", timeout=60)
    assert back["files"] == 1, back
    got = bob.wait_for("file_received", timeout=120)
    assert got["sha256"] == digest and got["size"] == 24 * MiB
    with open(got["path"], "rb") as saved:
        assert hashlib.sha256(saved.read()).hexdigest() == digest
    alice.wait_for(lambda e: e.get("type") == "file_delivered" and e["user"] == "bob",
                   timeout=60)
    assert not of(bob, "file_failed") and not of(alice, "file_failed")
    assert len(of(bob, "file_received")) == 1
    # Resumed, not started over: the bytes before the cut were not counted again.
    progress = [e["bytes"] for e in of(bob, "file_progress") if e["direction"] == "receive"]
    assert progress == sorted(progress), progress
    assert os.listdir(tmp_path / "dl-bob") == ["big.bin"]   # no .part left behind


def test_an_upload_cut_in_the_middle_sends_only_the_rest(start_host, join, faulty, tmp_path):
    host = start_host("--grace", "60")
    proxy = faulty(host.port, rate=4 * MiB)     # alice's network
    alice = join(proxy.port, "R", "alice", "--downloads", str(tmp_path / "dl-alice"))
    bob = join(host.port, "R", "bob", "--downloads", str(tmp_path / "dl-bob"))
    alice.wait_for(lambda e: e.get("type") == "system" and e["user"] == "bob")
    source = tmp_path / "src" / "up.bin"
    digest = make_file(source, 24 * MiB, 2)
    alice.send(f"/send {source}")
    bob.wait_for(lambda e: e.get("type") == "file_progress" and e["bytes"] >= 4 * MiB,
                 timeout=60)
    proxy.cut()
    proxy.rate = 0
    back = alice.wait_for("resumed", timeout=60)
    assert back["files"] == 1, back
    sent = alice.wait_for("file_sent", timeout=120)
    assert sent["sha256"] == digest
    got = bob.wait_for("file_received", timeout=120)
    assert got["sha256"] == digest
    alice.wait_for(lambda e: e.get("type") == "file_delivered" and e["user"] == "bob",
                   timeout=60)
    assert not of(bob, "file_failed") and not of(alice, "file_failed")
    # The bytes before the cut did not go again: bob's count never went back.
    progress = [e["bytes"] for e in of(bob, "file_progress")]
    assert progress == sorted(progress), progress


def test_files_both_ways_survive_random_faults(start_host, join, faulty, tmp_path):
    """Cuts, resets and stalls at random moments while a file goes each way
    through the faulty connection: both arrive whole, once."""
    host = start_host("--grace", "60")
    proxy = faulty(host.port, rate=8 * MiB)
    alice = join(proxy.port, "R", "alice", "--downloads", str(tmp_path / "dl-alice"))
    bob = join(host.port, "R", "bob", "--downloads", str(tmp_path / "dl-bob"))
    alice.wait_for(lambda e: e.get("type") == "system" and e["user"] == "bob")
    up, down = tmp_path / "src" / "up.bin", tmp_path / "src" / "down.bin"
    up_digest, down_digest = make_file(up, 20 * MiB, 3), make_file(down, 20 * MiB, 4)
    rng = random.Random(20261201)
    stop = threading.Event()

    def chaos() -> None:
        for _ in range(6):                  # bounded: six faults, then calm
            if stop.wait(rng.uniform(0.3, 0.9)):
                return
            rng.choice([proxy.cut, proxy.reset, lambda: proxy.pause(rng.uniform(0.1, 0.5))])()

    alice.send(f"/send {up}")
    bob.send(f"/send {down}")
    breaker = threading.Thread(target=chaos, daemon=True)
    breaker.start()
    breaker.join(30)
    stop.set()
    proxy.rate = 0
    got_up = bob.wait_for("file_received", timeout=180)
    got_down = alice.wait_for("file_received", timeout=180)
    assert got_up["sha256"] == up_digest and got_down["sha256"] == down_digest
    for client in (alice, bob):
        client.wait_for("file_delivered", timeout=60, since=0)
        assert not of(client, "file_failed"), of(client, "file_failed")
        assert len(of(client, "file_received")) == 1
    assert proxy.faults >= 1 and proxy.accepted > 1

