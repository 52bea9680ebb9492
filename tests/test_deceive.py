"""Names and text that deceive (issue 14): look-alike IDs, mixed scripts,
invisible characters, blank-looking messages, and what reaches a terminal.

Plain calls into ROOMS (and the terminal's Printer); the end-to-end half,
a fake host on loopback talking to real `--cli` clients, is in
tests/test_rogue_host.py.
"""

from __future__ import annotations

import io
import json

import pytest

import chatroom
from chatroom import Refused, Rooms, check_id, check_text, id_key, imitates_system, look_key

T0 = 1_700_000_000.0


def refused(code: str, call, *args) -> Refused:
    with pytest.raises(Refused) as info:
        call(*args)
    assert info.value.code == code, info.value
    return info.value


def room_with(*users: str) -> Rooms:
    rooms = Rooms(host_name="testhost")
    for i, user in enumerate(users):
        rooms.join(f"m-{user}", "lobby", user, T0 + i)
    return rooms


# --- look-alike IDs ----------------------------------------------------------------

# (the one in the room, the look-alike that comes second)
LOOK_ALIKES = [
    ("alice", "\u0430lice"),            # Cyrillic а (mixed: refused outright)
    ("alice", "ALICE"),                 # case
    ("alice", "ａｌｉｃｅ"),             # width
    ("paypal", "\u0440\u0430\u0443\u0440\u0430l"),   # Cyrillic р а у, Latin l
    ("bob", "b0b"),                     # digit zero for o (UTS #39 maps 0 -> O)
    ("AI", "Al"),                       # capital I and small l
    ("mary", "rnary"),                  # r n drawn together as m
    ("\u0441\u043e\u0440\u0435", "cope"),   # all-Cyrillic "соре", then Latin "cope"
    ("ΑΙ", "AI"),                       # Greek capitals, then Latin
]


@pytest.mark.parametrize("first, second", LOOK_ALIKES)
def test_a_look_alike_of_a_member_is_refused(first, second):
    rooms = room_with(first)
    with pytest.raises(Refused) as info:
        rooms.join("m2", "lobby", second, T0 + 5)
    assert info.value.code in ("user_taken", "bad_user_id"), info.value
    assert rooms.room_of("m2") is None
    assert id_key(first) == id_key(second) or look_key(first) == look_key(second) \
        or info.value.code == "bad_user_id"


def test_cyrillic_alice_beside_alice():
    """The issue's case: `аlice` (U+0430) next to `alice`. It mixes
    scripts, so it is refused as an ID at all; an all-Cyrillic look-alike
    of an all-Cyrillic member is user_taken."""
    refused("bad_user_id", room_with("alice").join, "m2", "lobby", "\u0430lice", T0)
    refused("bad_user_id", check_id, "\u0430lice", "user")
    rooms = room_with("\u0441\u043e\u0440\u0435")             # соре, all Cyrillic
    refused("user_taken", rooms.join, "m2", "lobby", "cope", T0)  # all Latin


def test_the_look_alike_is_refused_whichever_comes_first():
    rooms = room_with("cope")
    refused("user_taken", rooms.join, "m2", "lobby", "\u0441\u043e\u0440\u0435", T0)


def test_an_invisible_hangul_filler_is_refused():
    for filler in ("\u3164", "\u115f", "\u1160", "\uffa0"):   # all drawn as nothing
        refused("bad_user_id", check_id, "alice" + filler, "user")
        refused("bad_room_id", check_id, "lobby" + filler, "room")
        refused("bad_user_id", room_with("alice").join, "m2", "lobby", "alice" + filler, T0)
    refused("bad_user_id", check_id, "\u3164", "user")


@pytest.mark.parametrize("name", [
    pytest.param("\ua4e2\ua4ec\ua4e2\ua4d4\ua4f0\ua4df", id="lisu"),        # ꓢꓬꓢꓔꓰꓟ
    pytest.param("\u13da\u13a9\u13da\u13a2\u13ac\u13b7", id="cherokee"),    # ᏚᎩᏚᎢᎬᎷ
    pytest.param("\uabaa\uab79\uabaa\uab72\uab7c\uab87", id="cherokee-small"),
    pytest.param("\u054fY\u054fTEM", id="armenian"),                         # ՏYՏTEM
    pytest.param("\u1515Y\u1515T\u15f4\u15f0", id="canadian-syllabics"),     # ᔕYᔕTᗴᗰ
    pytest.param("\u0405\u03a5\u0405\u03a4\u0395\u039c", id="cyrillic-greek"),
    pytest.param("\ua731\u028f\ua731\u1d1b\u1d07\u1d0d", id="small-capitals"),
])
def test_system_in_other_scripts_is_refused(name):
    rooms = room_with("alice")
    refused("bad_user_id", rooms.join, "m", "lobby", name, T0)
    assert rooms.room_of("m") is None


@pytest.mark.parametrize("name", ["alice张", "Alice 张伟", "田中たなかtanaka", "김kim한",
                                  "陳ㄔㄣ chen", "张伟", "李 雷", "नमस्ते", "Zoë", "١٢٣",
                                  "Ελένη", "Юлия", "alice2", "3m"])
def test_highly_restrictive_mixtures_and_single_scripts_are_fine(name):
    assert check_id(name, "user") == name
    assert room_with(name).user_of(f"m-{name}") == name


@pytest.mark.parametrize("name", [
    "\u0430lice",           # Latin and Cyrillic
    "alicε",                # Latin and Greek
    "Юлия smith",           # Cyrillic and Latin words
    "한글カタカナ",          # Hangul and katakana: Korean and Japanese, no Han between
    "ελένη张",              # Greek and Han
    "a1\u09e7",             # digits of two systems: 1 and Bengali one
])
def test_mixed_scripts_beyond_highly_restrictive_are_refused(name):
    refused("bad_user_id", check_id, name, "user")
    refused("bad_room_id", check_id, name, "room")


def test_a_look_alike_room_name_is_the_same_room():
    """Someone who types `Iobby` (capital I) lands in `lobby`, not in a
    second room that lists the same."""
    rooms = room_with("alice")
    welcome = rooms.join("m2", "Iobby", "bob", T0)[0][1]
    assert welcome.room == "lobby" and set(welcome.members) == {"alice", "bob"}
    assert len(rooms) == 1


def test_a_look_alike_finds_the_member_it_looks_like():
    """/send @user and calls name a member: the one that looks like it."""
    rooms = room_with("Al", "bob")
    assert rooms.lookup("m-bob", "AI") == "m-Al"
    rooms.leave("m-Al", T0)
    rooms.join("m3", "lobby", "AI", T0)                 # the seat is free again
    assert rooms.lookup("m-bob", "Al") == "m3"


def test_skeletons_come_from_unicodes_data():
    assert chatroom.skeleton("\u0430") == "a"
    assert chatroom.skeleton("m") == "rn"
    assert chatroom.skeleton("\u13da") == "S"         # Cherokee DU
    assert chatroom.skeleton("x") == "x"
    assert "confusables 14.0.0" in chatroom.UNICODE_DATA


def test_the_system_rule_still_lets_ordinary_names_through():
    for name in ["alice", "systems", "mysystem", "stem", "Σύστημα", "张伟"]:
        assert not imitates_system(name)


# --- blank-looking and line-breaking text ------------------------------------------

@pytest.mark.parametrize("text", ["\u3164", "\u2800", "\u3164\u3164 \u2800", " \u3000 ",
                                  "\u115f\u1160", "\ufe0f", "\u2028", "\u2029\u2028 \n"])
def test_blank_looking_messages_are_refused(text):
    refused("bad_message", check_text, text, 1000)
    out = room_with("alice").say("m-alice", text, "c1", T0)
    assert [e.code for _, e in out] == ["bad_message"]


@pytest.mark.parametrize("sep", ["\u2028", "\u2029"])
def test_line_and_paragraph_separators_become_newlines(sep):
    assert check_text(f"one{sep}two", 1000) == "one\ntwo"
    rooms = room_with("alice", "bob")
    said = rooms.say("m-alice", f"one{sep}two", "c1", T0)
    assert {e.text for _, e in said} == {"one\ntwo"}


def test_text_with_a_blank_pattern_among_words_is_fine():
    assert check_text("a \u2800 b", 1000) == "a \u2800 b"
    assert check_text("\u3164 hi", 1000) == "\u3164 hi"


# --- what reaches a terminal ---------------------------------------------------------

NASTY = "bye-\x1b[2J\x1b]0;pwned\x07 \x9b31m \u202eevil\u202c \u2066x\u2069 \u2028 end"


def _raw_controls(text: str) -> list[str]:
    import unicodedata
    return [ch for ch in text if ch != "\n" and
            unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")]


@pytest.mark.parametrize("event", [
    {"type": "closed", "reason": NASTY},
    {"type": "error", "code": "x\x1b[2J", "message": NASTY},
    {"type": "message", "from": "ali\x1bce", "text": NASTY, "ts": T0},
    {"type": "system", "text": NASTY, "ts": T0},
    {"type": "call_ended", "peer": "bob", "reason": NASTY, "ts": T0},
    {"type": "call_failed", "peer": "bob", "reason": NASTY, "ts": T0},
    {"type": "file_failed", "name": NASTY, "reason": NASTY, "code": "a\x1b", "ts": T0},
])
def test_the_printer_never_writes_a_raw_control(event):
    out = io.StringIO()
    chatroom.Printer(json_mode=False, stream=out)(event)
    text = out.getvalue()
    assert text and not _raw_controls(text), repr(text)


def test_json_lines_escape_what_could_act_on_a_terminal_and_keep_the_text():
    event = {"type": "message", "from": "bob", "text": NASTY + " 你好", "ts": T0}
    out = io.StringIO()
    chatroom.Printer(json_mode=True, stream=out)(event)
    line = out.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    assert not _raw_controls(line[:-1]), repr(line)
    assert "你好" in line                           # readable, not \\u-escaped
    assert json.loads(line) == event                 # the same text, whole


def test_closed_reasons_outside_the_documented_set_read_as_protocol_error():
    assert chatroom.closing_reason("bye") == "quit"
    assert chatroom.closing_reason("host_shutdown") == "host_shutdown"
    assert chatroom.closing_reason(NASTY) == "protocol_error"
    assert chatroom.closing_reason("quit") == "protocol_error"    # ours, not a host's
