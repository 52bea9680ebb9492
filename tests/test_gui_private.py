"""Private conversations in the window (issue 15), under Xvfb with the
trace hook (tests/guidriver.py), as tests/test_gui.py drives the window.

A private line reaches one person and shows in their conversation only; a
line for a conversation not shown raises its unread count (on its row and
in the title), and showing that conversation clears it; what is typed goes
to the conversation shown; "Back to the room" returns to the room's.
"""

from __future__ import annotations

import os
from pathlib import Path

from test_gui import assert_exits_cleanly, join_from_launcher, start_gui, unique
from test_gui import procs as procs  # a fixture
from test_gui import x as x  # a fixture

from guidriver import LOOPBACK, Cli, Host


def member_row(gui, user: str) -> list[int]:
    """The screen box of `user`'s row in the members list (None: Everyone),
    as the newest trace of the list gives it (rows move with the layout)."""
    gui.wait_for(lambda e: e.get("gui") == "members"
                 and any(row["user"] == user for row in e["rows"]))
    record = [e for e in list(gui.lines) if e.get("gui") == "members"][-1]
    return next(row["box"] for row in record["rows"] if row["user"] == user)


def click(x, box: list[int]) -> None:
    left, top, width, height = box
    x.click(left + width / 2, top + height / 2)


def is_line(text: str, conversation: str | None):
    return lambda e: e.get("gui") == "shown" and e["kind"] == "message" \
        and e["text"] == text and e["conversation"] == conversation


def test_a_private_line_shows_in_its_conversation_only_and_counts_as_unread(
        x, tmp_path, procs):
    host = Host(unique("private"), advertise=False)
    procs.append(host)
    gui = start_gui(x, tmp_path, procs, "--server", f"{LOOPBACK}:{host.port}",
                    "--room", "lobby", "--user", "alice")
    first = join_from_launcher(gui, x)["elements"]["view"]
    bob = Cli(host.port, "lobby", "bob")
    procs.append(bob)
    carol = Cli(host.port, "lobby", "小红")
    procs.append(carol)
    gui.wait_for(lambda e: e.get("gui") == "members"
                 and e["members"] == ["alice", "bob", "小红"])

    # bob writes to alice alone: her window puts it in their conversation,
    # not the room's, and counts it as unread there and in the title.
    mark = gui.mark()
    bob.say("/msg alice 只给你看 just for you")
    line = gui.wait_for(lambda e: e.get("gui") == "shown" and e.get("kind") == "message",
                        start=mark)
    assert (line["text"], line["from"], line["conversation"]) == \
        ("只给你看 just for you", "bob", "bob")
    unread = gui.wait_for(lambda e: e.get("gui") == "unread", start=mark)
    assert unread["counts"] == {"bob": 1} and unread["total"] == 1
    assert unread["title"] == "(1) lobby · chatroom"
    # A room line lands in the room's conversation, shown: nothing unread.
    carol.say("大家好 everyone")
    gui.wait_for(is_line("大家好 everyone", None), start=mark)
    # 小红 never had bob's private line on her connection.
    got = carol.wait_for(lambda e: e.get("type") == "message")
    assert got["text"] == "大家好 everyone" and got["to"] is None
    assert not [e for e in carol.lines if e.get("text") == "只给你看 just for you"]

    # A click on bob opens the conversation: the count clears, the title too.
    mark = gui.mark()
    click(x, member_row(gui, "bob"))
    gui.wait_for(lambda e: e.get("gui") == "conversation" and e["user"] == "bob", start=mark)
    cleared = gui.wait_for(lambda e: e.get("gui") == "unread", start=mark)
    assert cleared["total"] == 0 and cleared["title"] == "lobby · chatroom"

    # What alice types now goes to bob alone, and shows in their conversation.
    mark = gui.mark()
    gui.type_into("chat", "input", "收到 got it, bob", enter=True)
    mine = gui.wait_for(lambda e: e.get("gui") == "shown" and e.get("text") == "收到 got it, bob",
                        start=mark)
    assert mine["mine"] is True and mine["conversation"] == "bob"
    answer = bob.wait_for(lambda e: e.get("type") == "message" and e["from"] == "alice")
    assert (answer["text"], answer["to"]) == ("收到 got it, bob", "bob")
    # A room line while bob's conversation is shown: the room's count rises.
    carol.say("room line while away")
    gui.wait_for(is_line("room line while away", None), start=mark)
    away = gui.wait_for(lambda e: e.get("gui") == "unread" and e["total"] == 1, start=mark)
    assert away["counts"] == {"": 1} and away["title"] == "(1) lobby · chatroom"
    carol.say("sentinel 2")
    gui.wait_for(is_line("sentinel 2", None), start=mark)
    gui.wait_for(lambda e: e.get("gui") == "unread" and e["total"] == 2, start=mark)
    assert not [e for e in carol.lines if e.get("text") == "收到 got it, bob"]

    layout = gui.window("chat")
    assert layout["conversation"] == "bob" and "room" in layout["elements"]
    x.wait_viewable(layout["xid"])
    shot = os.environ.get("CHATROOM_SHOT_DIR")
    if shot:                                    # looked at by hand, not asserted
        record = gui.wait_for(lambda e: e.get("gui") == "shown"
                              and e.get("text") == "收到 got it, bob")
        gui.painted(record)
        x.screenshot(Path(shot) / "chat-private.png", layout["xid"])

    # "Back to the room": the room's conversation again, its count cleared.
    mark = gui.mark()
    gui.click("chat", "room")
    gui.wait_for(lambda e: e.get("gui") == "conversation" and e["user"] is None, start=mark)
    back = gui.wait_for(lambda e: e.get("gui") == "unread" and e["total"] == 0, start=mark)
    assert back["counts"] == {} and back["title"] == "lobby · chatroom"
    layout = gui.window("chat", start=mark)
    assert "room" not in layout["elements"]
    assert layout["elements"]["view"][1] == first[1], "the hidden bar left a gap"
    if shot:
        record = gui.wait_for(lambda e: e.get("gui") == "picked" and e["user"] is None,
                              start=mark)
        layout = gui.window("chat", start=mark)
        x.screenshot(Path(shot) / "chat-private-back.png", layout["xid"])

    gui.close("chat")
    assert_exits_cleanly(gui)


def test_in_a_private_conversation_a_file_and_msg_go_to_that_person(x, tmp_path, procs):
    """A file sent while bob's conversation is shown goes to bob alone (its
    card in that conversation); /msg typed in the window opens the
    conversation with that person and sends there."""
    host = Host(unique("private"), advertise=False)
    procs.append(host)
    gui = start_gui(x, tmp_path, procs, "--server", f"{LOOPBACK}:{host.port}",
                    "--room", "lobby", "--user", "alice")
    join_from_launcher(gui, x)
    bob = Cli(host.port, "lobby", "bob", downloads=tmp_path / "bob")
    procs.append(bob)
    carol = Cli(host.port, "lobby", "carol", downloads=tmp_path / "carol")
    procs.append(carol)
    gui.wait_for(lambda e: e.get("gui") == "members"
                 and e["members"] == ["alice", "bob", "carol"])

    mark = gui.mark()
    gui.type_into("chat", "input", "/msg carol 私信 hello carol", enter=True)
    gui.wait_for(lambda e: e.get("gui") == "conversation" and e["user"] == "carol",
                 start=mark)
    mine = gui.wait_for(lambda e: e.get("gui") == "shown" and e.get("text") == "私信 hello carol",
                        start=mark)
    assert mine["conversation"] == "carol" and mine["mine"] is True
    got = carol.wait_for(lambda e: e.get("type") == "message" and e["from"] == "alice")
    assert (got["text"], got["to"]) == ("私信 hello carol", "carol")

    click(x, member_row(gui, "bob"))
    gui.wait_for(lambda e: e.get("gui") == "conversation" and e["user"] == "bob", start=mark)
    report = tmp_path / "只给bob.txt"
    report.write_bytes(b"for bob only\n" * 100)
    gui.type_into("chat", "input", f"/send {report}", enter=True)
    card = gui.wait_for(lambda e: e.get("gui") == "shown" and e.get("kind") == "file",
                        start=mark)
    assert card["conversation"] == "bob" and card["detail"].endswith("to bob")
    saved = bob.wait_for(lambda e: e.get("type") == "file_received", timeout=30)
    assert saved["name"] == "只给bob.txt"
    carol.say("sentinel")
    carol.wait_for(lambda e: e.get("type") == "message" and e["text"] == "sentinel")
    assert not [e for e in carol.lines if e.get("type", "").startswith("file")]
    assert not [e for e in bob.lines if e.get("text") == "私信 hello carol"]

    # carol writes while bob's conversation is shown, then leaves: her count
    # goes with her row, so the title's total can always be cleared.
    mark = gui.mark()
    carol.say("/msg alice 再见 bye")
    gui.wait_for(lambda e: e.get("gui") == "unread" and e["counts"] == {"": 1, "carol": 1},
                 start=mark)                # (the room: carol's sentinel above)
    assert carol.quit() == 0
    gone = gui.wait_for(lambda e: e.get("gui") == "unread" and "carol" not in e["counts"],
                        start=mark)
    assert gone["counts"] == {"": 1} and gone["title"] == "(1) lobby · chatroom"

    gui.close("chat")
    assert_exits_cleanly(gui)
