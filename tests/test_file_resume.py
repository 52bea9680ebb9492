"""Files that carry on after a drop (issue 13): a connection cut in the
middle of a file, either way, resumes from the bytes already received
instead of starting over or failing. Driven as a person or a script would:
a host, clients with --cli --json, and a FaultProxy (tests/faults.py) that
slows one client's connection down and cuts it mid-file. All on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time

import pytest

MiB = 1 << 20


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


@pytest.mark.timeout(600)          # its own waits (up to 180 s each) fail first, saying why
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


def test_a_client_killed_mid_download_resumes_it_when_started_again(start_host, join, faulty,
                                                                    tmp_path):
    """kill -9 of bob while a file comes to him: started again (same room,
    ID, downloads and --state-dir), he is back in his place (`resumed`, the
    host held it) and the download goes on from the bytes on his disk."""
    host = start_host("--grace", "60")
    proxy = faulty(host.port, rate=4 * MiB)
    state, downloads = tmp_path / "state-bob", tmp_path / "dl-bob"
    alice = join(host.port, "R", "alice", "--downloads", str(tmp_path / "dl-alice"))
    bob = join(proxy.port, "R", "bob", "--downloads", str(downloads), "--state-dir", str(state))
    alice.wait_for(lambda e: e.get("type") == "system" and e["user"] == "bob")
    source = tmp_path / "src" / "big.bin"
    digest = make_file(source, 24 * MiB, 5)
    alice.send(f"/send {source}")
    bob.wait_for(lambda e: e.get("type") == "file_progress" and e["bytes"] >= 4 * MiB,
                 timeout=60)
    deadline = time.monotonic() + 30        # bob keeps his place on disk once a second
    while not any("big.bin" in p.read_text() for p in state.rglob("*.json")):
        assert time.monotonic() < deadline, "bob never wrote his download down"
        time.sleep(0.05)
    bob.proc.kill()
    bob.proc.wait(10)
    proxy.cut()
    parts = [p for p in os.listdir(downloads) if p.endswith(".part")]
    assert len(parts) == 1 and os.path.getsize(downloads / parts[0]) > 0, parts
    proxy.rate = 0                          # the same address and port as before
    again = join(proxy.port, "R", "bob", "--downloads", str(downloads), "--state-dir",
                 str(state), ready=False)
    back = again.wait_for("resumed", timeout=60)
    assert back["files"] == 1, back
    offer = again.wait_for("file_offer", timeout=30)
    assert offer["name"] == "big.bin"
    first = again.wait_for("file_progress", timeout=60)
    assert first["bytes"] > 0, first            # went on from the bytes on disk
    got = again.wait_for("file_received", timeout=120)
    assert got["sha256"] == digest
    alice.wait_for(lambda e: e.get("type") == "file_delivered" and e["user"] == "bob",
                   timeout=60)
    assert not [e for e in alice.seen() if e.get("type") == "system" and e["user"] == "bob"
                and e["event"] == "leave"]      # nobody saw him go
    assert sorted(os.listdir(downloads)) == ["big.bin"]


def test_a_second_login_with_a_live_clients_id_does_not_take_its_place(start_host, join,
                                                                       tmp_path):
    """The record on disk is for getting back after a crash only: a second
    process with the same ID while the first runs is refused (user_taken),
    and the first is not disturbed."""
    host = start_host("--grace", "60")
    state = tmp_path / "state"
    first = join(host.port, "R", "alice", "--state-dir", str(state))
    first.send("hello")
    first.wait_for(lambda e: e.get("type") == "message" and e["text"] == "hello")
    second = join(host.port, "R", "alice", "--state-dir", str(state), ready=False)
    assert second.wait_for("error", timeout=60)["code"] == "user_taken"
    first.send("still here")
    first.wait_for(lambda e: e.get("type") == "message" and e["text"] == "still here")
    assert not [e for e in first.seen() if e.get("type") in ("reconnecting", "closed")]


def test_the_place_kept_on_disk_is_private_and_only_for_a_crashed_run(tmp_path):
    import subprocess
    import sys

    import chatroom
    place = chatroom.Place(["127.0.0.1"], 47300, "大厅", "张伟")
    place.token, place.seen, place.pending = "ab" * 16, 42, {"x-1": "你好"}
    store = chatroom.PlaceStore(tmp_path)
    job = store.save(place, [{"transfer": 3, "part": ".a.chatroom-1-00.part", "from": "bob",
                              "name": "a", "size": 10, "to": ""}])
    assert job is not None
    job()
    assert store.save(place, []) is not None        # changed: written again
    assert store.save(place, []) is None            # unchanged: not
    (path,) = (tmp_path / "places").glob("*.json")
    assert path.stat().st_mode & 0o777 == 0o600
    fresh = chatroom.Place(["127.0.0.1"], 47300, "大厅", "张伟")
    assert chatroom.PlaceStore(tmp_path).load(fresh) == {}   # written by us: alive
    record = json.loads(path.read_text())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    record["pid"] = int(dead.stdout)                # a run that is gone
    path.write_text(json.dumps(record))
    loaded = chatroom.PlaceStore(tmp_path).load(fresh)
    assert chatroom.restore_place(fresh, loaded) == [{"transfer": 3, "part":
                                                      ".a.chatroom-1-00.part", "from": "bob",
                                                      "name": "a", "size": 10, "to": ""}]
    assert (fresh.token, fresh.seen, fresh.pending) == ("ab" * 16, 42, {"x-1": "你好"})
    elsewhere = chatroom.Place(["10.9.9.9"], 47300, "大厅", "张伟")
    assert chatroom.PlaceStore(tmp_path).load(elsewhere) == {}
    for junk in ("{", "[]", '{"token": 5}', '{"pid": "x"}'):
        path.write_text(junk)
        assert chatroom.PlaceStore(tmp_path).load(fresh) == {}
    assert chatroom.PlaceStore(None).save(place, []) is None   # nothing kept
