"""Tests of chatroom's rooms (ROOMS in chatroom.py): plain calls, fake time.

`Rooms` returns (member handle, event) pairs and never sends anything, so
each test calls it and looks at what would go to whom. Handles are strings
here (and bare objects in one test: rooms must not look inside them).
"""

from __future__ import annotations

import dataclasses
import unicodedata

import pytest

import chatroom
from chatroom import (
    HELP_TEXT,
    PROTOCOL_VERSION,
    Error,
    Help,
    Members,
    Message,
    Refused,
    Rooms,
    System,
    Welcome,
    check_id,
    check_text,
    id_key,
    imitates_system,
    printable,
)

T0 = 1_700_000_000.0


# --- helpers ---------------------------------------------------------------

def make(**kwargs) -> Rooms:
    return Rooms(host_name="testhost", **kwargs)


def to(deliveries, member) -> list:
    """The events `member` gets, in order."""
    return [event for who, event in deliveries if who == member]


def recipients(deliveries) -> set:
    return {who for who, _ in deliveries}


def events(deliveries) -> list:
    return [event for _, event in deliveries]


def refused(code: str, call, *args, **kwargs) -> Refused:
    with pytest.raises(Refused) as info:
        call(*args, **kwargs)
    assert info.value.code == code, info.value
    return info.value


def room_with(*users: str, room: str = "lobby", **kwargs) -> Rooms:
    """Rooms where handle "m-<user>" joined `room` as each user, in order."""
    rooms = make(**kwargs)
    for i, user in enumerate(users):
        rooms.join(f"m-{user}", room, user, T0 + i)
    return rooms


# --- IDs ---------------------------------------------------------------------

ACCEPTED_IDS = [
    "alice", "张伟", "bob smith", "a-b_c.d", "Zoë", "١٢٣", "a" * 32,
    "नमस्ते",            # Devanagari: combining marks after letters
    "สวัสดี",             # Thai
    "x\u0353\u0353\u0353",  # three marks on one letter is the most
    "...", "李 雷",
]

# Bad for both User and Room IDs.
BAD_IDS = [
    "", "a" * 33, " alice", "alice ", "  ", "a\u202eb", "a\u200bb", "a\u00adb",
    "a\nb", "a\tb", "a\x00b", "a\x1bb", "a/b", "a@b", "<b>", "a:b", "a\u3000b",
    "\u0301",                     # a lone combining mark
    "\u0301abc",                  # a mark before any letter
    "1\u0301",                    # a mark on a digit
    "x\u0353\u0353\u0353\u0353",  # four marks on one letter (zalgo)
    "Ⅻ",                          # a letter-number, not a digit
    "😀", "a\ud800b", "a\ue000b",
]

SYSTEM_LIKE = [
    "SYSTEM", "system", "System", "sYsTeM", "ＳＹＳＴＥＭ", "S.Y.S.T.E.M",
    "S Y S T E M", "S_Y-S.T E M", "5Y5TEM", "SY5T3M",
    "ЅУЅТЕМ",         # Cyrillic look-alikes
    "SУSТЕМ",         # some Latin, some Cyrillic
    "sÿstem", "systém", "ſystem", "ꜱystem",
]


@pytest.mark.parametrize("raw", ACCEPTED_IDS)
@pytest.mark.parametrize("kind", ["user", "room"])
def test_accepted_ids(raw, kind):
    assert check_id(raw, kind) == unicodedata.normalize("NFC", raw)


@pytest.mark.parametrize("raw", ACCEPTED_IDS)
def test_accepted_ids_can_join(raw):
    rooms = make()
    welcome = to(rooms.join("m", raw, raw, T0), "m")[0]
    assert welcome == Welcome(PROTOCOL_VERSION, raw, raw, (raw,), "testhost")


def test_nfc_and_nfd_give_the_same_display_form():
    nfc, nfd = "Zo\u00eb", "Zoe\u0308"
    assert check_id(nfd, "user") == check_id(nfc, "user") == nfc
    rooms = make()
    assert to(rooms.join("m1", "lobby", nfd, T0), "m1")[0].user == nfc
    refused("user_taken", rooms.join, "m2", "lobby", nfc, T0)


def test_length_is_counted_after_nfc():
    """32 "é" typed as e + U+0301 are 64 code points but 32 characters."""
    assert check_id("e\u0301" * 32, "user") == "\u00e9" * 32
    refused("bad_user_id", check_id, "e\u0301" * 33, "user")


@pytest.mark.parametrize("raw", BAD_IDS)
def test_bad_user_ids(raw):
    refused("bad_user_id", check_id, raw, "user")
    rooms = make()
    refused("bad_user_id", rooms.join, "m", "lobby", raw, T0)
    assert len(rooms) == 0 and rooms.room_of("m") is None


@pytest.mark.parametrize("raw", BAD_IDS)
def test_bad_room_ids(raw):
    refused("bad_room_id", check_id, raw, "room")
    rooms = make()
    refused("bad_room_id", rooms.join, "m", raw, "alice", T0)
    assert len(rooms) == 0 and rooms.room_of("m") is None


@pytest.mark.parametrize("raw", SYSTEM_LIKE)
def test_system_and_its_imitations_are_refused_as_user_ids(raw):
    assert imitates_system(raw)
    rooms = room_with("alice")
    refused("bad_user_id", rooms.join, "m", "lobby", raw, T0)
    assert rooms.room_of("m") is None
    assert rooms.who("m-alice") == [("m-alice", Members(("alice",)))]


@pytest.mark.parametrize("raw", [
    pytest.param("S\u03a5STEM", id="greek-capital-upsilon"),      # SΥSTEM
    pytest.param("\u0405\u03a5\u0405\u03a4\u0395\u039c", id="cyrillic-and-greek"),  # ЅΥЅΤΕΜ
    pytest.param("\ua731\u028f\ua731\u1d1b\u1d07\u1d0d", id="small-capitals"),  # ꜱʏꜱᴛᴇᴍ
])
def test_look_alikes_missing_from_the_table_are_refused(raw):
    """Spellings that render as SYSTEM and slipped past the hand-made table
    `imitates_system` once had.

    Greek capital upsilon (U+03A5) is drawn exactly like Latin Y, but it
    casefolds to U+03C5, which the table did not map (it mapped gamma
    instead). The table mapped small capital S (U+A731) but not the small
    capitals Y T E M (U+028F U+1D1B U+1D07 U+1D0D). The two that mix
    scripts are now refused by check_id too (issue 14).
    """
    assert imitates_system(raw)
    refused("bad_user_id", make().join, "m", "lobby", raw, T0)


@pytest.mark.parametrize("name", ["alice", "systems", "mysystem", "SYSTEM1", "sys",
                                  "stem", "张伟", "system admin", "S Y S"])
def test_names_that_do_not_imitate_system(name):
    assert not imitates_system(name)


def test_id_key_folds_case_and_width():
    assert id_key("Alice") == id_key("alice") == id_key("ａｌｉｃｅ") == id_key("ALICE")
    assert id_key("alice") != id_key("alicia")
    assert id_key("Straße") == id_key("STRASSE")


# --- join ----------------------------------------------------------------------

def test_first_join():
    rooms = make()
    out = rooms.join("m1", "lobby", "alice", T0)
    assert out == [
        ("m1", Welcome(PROTOCOL_VERSION, "lobby", "alice", ("alice",), "testhost")),
        ("m1", System(1, "enter", "alice", "[SYSTEM] alice entered the room", T0)),
    ]
    assert rooms.user_of("m1") == "alice"
    assert rooms.summary() == [("lobby", 1)]


def test_join_tells_everyone_including_the_joiner():
    rooms = room_with("alice", "bob")
    out = rooms.join("m3", "lobby", "张伟", T0 + 5)
    welcome, notice = to(out, "m3")
    assert welcome.members == ("alice", "bob", "张伟")          # join order
    assert welcome.user == "张伟" and welcome.room == "lobby"
    assert notice == System(3, "enter", "张伟", "[SYSTEM] 张伟 entered the room", T0 + 5)
    assert notice.text.startswith("[SYSTEM] ")
    for other in ("m-alice", "m-bob"):
        assert to(out, other) == [notice]
        assert to(out, other)[0] is notice                     # one object for all
    assert recipients(out) == {"m-alice", "m-bob", "m3"}


def test_welcome_comes_first_then_history_then_notice():
    rooms = room_with("alice")
    rooms.say("m-alice", "hi", "a1", T0 + 1)
    kinds = [type(e) for e in to(rooms.join("m2", "lobby", "bob", T0 + 2), "m2")]
    assert kinds == [Welcome, Message, System]


def test_room_ids_are_case_insensitive_and_keep_the_first_spelling():
    rooms = make()
    rooms.join("m1", "Lobby", "alice", T0)
    welcome = to(rooms.join("m2", "ＬＯＢＢＹ", "bob", T0), "m2")[0]
    assert welcome.room == "Lobby"
    assert welcome.members == ("alice", "bob")
    assert rooms.summary() == [("Lobby", 2)]


def test_member_handles_are_opaque():
    rooms = make()
    a, b = object(), object()
    rooms.join(a, "lobby", "alice", T0)
    out = rooms.join(b, "lobby", "bob", T0)
    assert recipients(out) == {a, b}
    assert rooms.recipients(a, "BOB") == [b]          # found by ID, case-folded
    with pytest.raises(Refused) as refused:
        rooms.recipients(a, "carol")
    assert refused.value.code == "no_such_user"


@pytest.mark.parametrize("second", ["alice", "Alice", "ALICE", "ａｌｉｃｅ", "Ａlice"])
def test_user_taken_leaves_the_first_user_alone(second):
    rooms = room_with("alice", "bob")
    refused("user_taken", rooms.join, "m2", "lobby", second, T0 + 9)
    assert rooms.room_of("m2") is None
    assert rooms.user_of("m-alice") == "alice"
    assert rooms.who("m-alice") == [("m-alice", Members(("alice", "bob")))]
    # No seq was spent: the next room event follows bob's enter notice (2).
    out = rooms.say("m-alice", "still here", "a1", T0 + 10)
    assert recipients(out) == {"m-alice", "m-bob"}
    assert events(out)[0].seq == 3


def test_same_name_in_another_room_is_fine():
    rooms = room_with("alice")
    out = rooms.join("m2", "kitchen", "Alice", T0)
    assert to(out, "m2")[0].members == ("Alice",)
    assert recipients(out) == {"m2"}


def test_one_handle_joins_once():
    rooms = room_with("alice")
    refused("bad_frame", rooms.join, "m-alice", "kitchen", "alice2", T0)
    assert rooms.summary() == [("lobby", 1)]


def test_room_full():
    rooms = room_with("a", "b", max_members=2)
    refused("room_full", rooms.join, "m3", "lobby", "c", T0)
    assert rooms.room_of("m3") is None
    rooms.join("m3", "kitchen", "c", T0)            # other rooms still open
    rooms.leave("m-a", T0)
    assert to(rooms.join("m4", "lobby", "d", T0), "m4")[0].members == ("b", "d")


def test_bad_user_in_a_bad_room_is_a_bad_room():
    """The room is checked first; nothing is created either way."""
    rooms = make()
    refused("bad_room_id", rooms.join, "m", "a/b", "SYSTEM", T0)
    refused("bad_user_id", rooms.join, "m", "lobby", "SYSTEM", T0)
    assert len(rooms) == 0 and rooms.summary() == []


# --- say -----------------------------------------------------------------------

def test_say_goes_to_everyone_including_the_sender():
    rooms = room_with("alice", "bob", "carol")
    out = rooms.say("m-bob", "你好 everyone", "b-1", T0 + 10)
    assert recipients(out) == {"m-alice", "m-bob", "m-carol"}
    assert len(out) == 3
    message = events(out)[0]
    assert all(event is message for event in events(out))
    assert message == Message(4, "b-1", "bob", "你好 everyone", T0 + 10, False)


def test_seq_counts_every_room_event():
    rooms = room_with("alice", "bob")             # enter notices: 1, 2
    seqs = [events(rooms.say("m-alice", f"n{i}", f"a{i}", T0))[0].seq for i in range(3)]
    seqs.append(events(rooms.leave("m-bob", T0))[0].seq)
    seqs.append(events(rooms.say("m-alice", "again", "a9", T0))[0].seq)
    assert seqs == [3, 4, 5, 6, 7]


def test_rooms_are_isolated():
    """Nothing said in one room reaches another; each room counts its own seq."""
    rooms = make()
    rooms.join("a1", "red", "alice", T0)
    rooms.join("a2", "red", "bob", T0)
    rooms.join("b1", "blue", "alice", T0)         # same name, other room
    for i in range(5):
        out = rooms.say("a1", f"red {i}", f"r{i}", T0)
        assert recipients(out) == {"a1", "a2"}
    out = rooms.say("b1", "blue 0", "r0", T0)     # same id, other room
    assert recipients(out) == {"b1"}
    assert events(out)[0].seq == 2                # after its own enter notice
    assert events(out)[0].text == "blue 0"
    out = rooms.join("b2", "blue", "carol", T0)
    assert [e.text for e in to(out, "b2") if isinstance(e, Message)] == ["blue 0"]
    assert recipients(out) == {"b1", "b2"}


@pytest.mark.parametrize("text", ["help", "Help", "hElP", "HELP", "  HELP  ", "help\n"])
def test_help_goes_to_the_sender_alone(text):
    rooms = room_with("alice", "bob")
    assert rooms.say("m-alice", text, "a1", T0) == [("m-alice", Help(HELP_TEXT))]
    out = rooms.say("m-alice", "after", "a2", T0)
    assert events(out)[0].seq == 3                # help took no seq
    history = [e for e in to(rooms.join("m3", "lobby", "carol", T0), "m3")
               if isinstance(e, Message)]
    assert [m.text for m in history] == ["after"]  # and is not in history


@pytest.mark.parametrize("text", ["help me", "/help", "helpful", "?"])
def test_not_quite_help_is_a_message(text):
    out = room_with("alice", "bob").say("m-alice", text, "a1", T0)
    assert [type(e) for e in events(out)] == [Message, Message]


@pytest.mark.parametrize("topic", ["text chat", "/check", "1 minute",
                                   "file to everyone", "[system]", "/who", "/quit", "/msg"])
def test_help_text_mentions(topic):
    assert topic in HELP_TEXT.casefold()


@pytest.mark.parametrize("text", ["[SYSTEM] bob left the room",
                                  "[SYSTEM] alice entered the room",
                                  "hi\n[SYSTEM] bob left the room"])
def test_user_text_posing_as_a_notice_is_that_users_message(text):
    rooms = room_with("alice", "bob")
    out = rooms.say("m-alice", text, "a1", T0)
    assert not any(isinstance(e, System) for e in events(out))
    message = events(out)[0]
    assert isinstance(message, Message)
    assert message.sender == "alice" and message.text == text


# --- message size and characters ---------------------------------------------

@pytest.mark.parametrize("text, ok", [
    ("a" * 30, True),
    ("a" * 31, False),
    ("中" * 10, True),              # 30 bytes
    ("中" * 10 + "a", False),       # 31 bytes in 11 characters
    ("😀" * 7 + "aa", True),        # 30 bytes
    ("😀" * 7 + "aaa", False),
])
def test_message_size_counts_utf8_bytes(text, ok):
    rooms = room_with("alice", "bob", max_message_bytes=30)
    out = rooms.say("m-alice", text, "a-7", T0)
    if ok:
        assert recipients(out) == {"m-alice", "m-bob"}
        assert events(out)[0].text == text       # never cut
    else:
        assert len(out) == 1
        who, error = out[0]
        assert who == "m-alice"
        assert isinstance(error, Error)
        assert (error.code, error.id) == ("message_too_long", "a-7")
    # A refusal spends no seq.
    assert events(rooms.say("m-alice", "next", "a-8", T0))[0].seq == (4 if ok else 3)


def test_default_message_limit_is_16_kib():
    assert chatroom.MAX_MESSAGE_BYTES == 16384
    rooms = room_with("alice")
    assert isinstance(events(rooms.say("m-alice", "x" * 16384, "a1", T0))[0], Message)
    error = events(rooms.say("m-alice", "x" * 16385, "a2", T0))[0]
    assert error == Error("message_too_long", error.message, "a2")


@pytest.mark.parametrize("text", ["", " ", "   ", "\n", "\t \n", "\u3000"])
def test_empty_message_is_bad(text):
    rooms = room_with("alice", "bob")
    out = rooms.say("m-alice", text, "a1", T0)
    assert out == [("m-alice", Error("bad_message", events(out)[0].message, "a1"))]


@pytest.mark.parametrize("text", ["a\x00b", "\x1b[31mred", "a\rb", "a\x7f", "a\u202eb",
                                  "a\u200bb", "a\u2066b", "a\ufeffb", "a\ue000b"])
def test_control_and_bidi_characters_are_bad(text):
    rooms = room_with("alice", "bob")
    out = rooms.say("m-alice", text, "a1", T0)
    assert [(w, e.code) for w, e in out] == [("m-alice", "bad_message")]


def test_tabs_and_newlines_are_kept():
    text = "line one\n\tline two\nline three"
    out = room_with("alice").say("m-alice", text, "a1", T0)
    assert events(out)[0].text == text


def test_check_text_directly():
    assert check_text("你好\tworld\n", 100) == "你好\tworld\n"
    refused("message_too_long", check_text, "中", 2)
    refused("bad_message", check_text, " \n ", 100)
    refused("bad_message", check_text, "a\u202e", 100)
    refused("message_too_long", check_text, "a\u202e" * 50, 10)   # size is checked first


# --- duplicate ids -----------------------------------------------------------

def test_resend_is_confirmed_again_not_shown_twice():
    rooms = room_with("alice", "bob")
    first = events(rooms.say("m-alice", "hello", "a-1", T0))[0]
    again = rooms.say("m-alice", "hello", "a-1", T0 + 1)
    assert again == [("m-alice", first)]
    assert again[0][1] == first       # the same seq, id, sender, text and time
    assert events(rooms.say("m-alice", "next", "a-2", T0 + 2))[0].seq == first.seq + 1


def test_same_id_from_another_user_is_a_new_message():
    rooms = room_with("alice", "bob")
    first = events(rooms.say("m-alice", "hello", "x-1", T0))[0]
    out = rooms.say("m-bob", "hello", "x-1", T0)
    assert recipients(out) == {"m-alice", "m-bob"}
    assert events(out)[0].sender == "bob"
    assert events(out)[0].seq == first.seq + 1


# --- history -----------------------------------------------------------------

def test_late_joiner_gets_the_last_n_messages_oldest_first():
    rooms = room_with("alice", history_limit=3)
    live = [events(rooms.say("m-alice", f"m{i}", f"a{i}", T0 + i))[0] for i in range(5)]
    out = rooms.join("m-bob", "lobby", "bob", T0 + 10)
    history = [e for e in to(out, "m-bob") if isinstance(e, Message)]
    assert [m.text for m in history] == ["m2", "m3", "m4"]
    assert history == [dataclasses.replace(m, history=True) for m in live[2:]]
    assert all(m.history is False for m in live)             # live copies untouched
    assert to(out, "m-alice") == [System(7, "enter", "bob", "[SYSTEM] bob entered the room",
                                         T0 + 10)]           # no replay to alice


def test_history_holds_messages_not_notices():
    rooms = room_with("alice", "bob", "carol")
    rooms.leave("m-carol", T0)
    out = rooms.join("m4", "lobby", "dave", T0)
    assert [type(e) for e in to(out, "m4")] == [Welcome, System]


def test_history_limit_zero():
    rooms = room_with("alice", history_limit=0)
    rooms.say("m-alice", "hi", "a1", T0)
    assert [type(e) for e in to(rooms.join("m2", "lobby", "bob", T0), "m2")] == [Welcome, System]


def test_default_history_is_100():
    assert chatroom.HISTORY_LIMIT == 100
    rooms = room_with("alice")
    for i in range(105):
        rooms.say("m-alice", f"m{i}", f"a{i}", T0)
    history = [e for e in to(rooms.join("m2", "lobby", "bob", T0), "m2")
               if isinstance(e, Message)]
    assert [m.text for m in history] == [f"m{i}" for i in range(5, 105)]


# --- leave -------------------------------------------------------------------

def test_leave_tells_the_others():
    rooms = room_with("alice", "bob")
    out = rooms.leave("m-bob", T0 + 3)
    assert out == [("m-alice", System(3, "leave", "bob", "[SYSTEM] bob left the room", T0 + 3))]
    assert rooms.room_of("m-bob") is None
    assert rooms.who("m-alice") == [("m-alice", Members(("alice",)))]


def test_leave_says_why_when_the_host_ended_it():
    rooms = room_with("alice", "bob")
    notice = events(rooms.leave("m-bob", T0, "connection lost"))[0]
    assert notice.text == "[SYSTEM] bob left the room (connection lost)"


def test_leave_frees_the_name():
    rooms = room_with("alice", "bob")
    rooms.leave("m-bob", T0)
    assert to(rooms.join("m3", "lobby", "BOB", T0), "m3")[0].members == ("alice", "BOB")


def test_leave_unknown_member_is_a_no_op():
    rooms = room_with("alice")
    assert rooms.leave("nobody", T0) == []
    assert rooms.leave("m-alice", T0) == []
    assert rooms.leave("m-alice", T0) == []


def test_last_one_out_forgets_the_room():
    """The room, its seq and history are gone: a new room of that name starts over."""
    rooms = room_with("alice", "bob")
    rooms.say("m-alice", "secret", "a1", T0)
    rooms.leave("m-alice", T0)
    assert rooms.leave("m-bob", T0) == []
    assert len(rooms) == 0 and rooms.summary() == []
    out = rooms.join("m3", "LOBBY", "carol", T0 + 60)
    assert out == [
        ("m3", Welcome(PROTOCOL_VERSION, "LOBBY", "carol", ("carol",), "testhost")),
        ("m3", System(1, "enter", "carol", "[SYSTEM] carol entered the room", T0 + 60)),
    ]
    # The old message id is forgotten too: the same id is a new message.
    rooms.join("m4", "lobby", "alice", T0 + 61)
    assert events(rooms.say("m4", "secret", "a1", T0 + 62))[0].seq == 3


# --- summary -----------------------------------------------------------------

def test_summary_largest_first():
    rooms = make()
    for i, (room, user) in enumerate([("b", "u1"), ("c", "u1"), ("c", "u2"), ("a", "u1"),
                                      ("c", "u3"), ("a", "u2"), ("d", "u1")]):
        rooms.join(f"m{i}", room, user, T0)
    assert rooms.summary() == [("c", 3), ("a", 2), ("b", 1), ("d", 1)]
    assert len(rooms) == 4


# --- printable ---------------------------------------------------------------

@pytest.mark.parametrize("raw, shown", [
    ("\x1b[31mred", "\\u001b[31mred"),
    ("abc\u202eevil", "abc\\u202eevil"),
    ("zero\u200bwidth", "zero\\u200bwidth"),
    ("a\rb", "a\\u000db"),
    ("para\u2029graph", "para\\u2029graph"),
    ("你好 世界", "你好 世界"),
    ("tab\there", "tab\there"),
    ("Zoë 😀", "Zoë 😀"),
])
def test_printable(raw, shown):
    assert printable(raw) == shown


def test_printable_leaves_no_control_characters():
    everything = "".join(chr(c) for c in range(0x20)) + "\x7f\u202e\u2066\ufeff"
    out = printable(everything)
    assert all(unicodedata.category(ch)[0] != "C" or ch == "\t" for ch in out)


# --- private lines (issue 15) ---------------------------------------------------

def test_a_private_line_goes_to_the_sender_and_its_recipient_only():
    rooms = room_with("alice", "bob", "carol")
    out = rooms.say("m-alice", "只给你 only you", "a-1", T0 + 5, to="BOB")
    assert recipients(out) == {"m-alice", "m-bob"}      # carol gets nothing
    message = events(out)[0]
    assert message == Message(4, "a-1", "alice", "只给你 only you", T0 + 5, False, to="bob")
    assert to(out, "m-alice") == to(out, "m-bob") == [message]   # bob's display form


def test_a_room_line_says_no_recipient():
    rooms = room_with("alice", "bob")
    assert events(rooms.say("m-alice", "hi all", "a-1", T0))[0].to == ""


def test_a_private_line_to_nobody_here_is_refused_and_not_counted():
    rooms = room_with("alice", "bob")
    out = rooms.say("m-alice", "psst", "a-1", T0, to="zed")
    assert out == [("m-alice", Error("no_such_user", out[0][1].message, "a-1"))]
    assert "'zed'" in out[0][1].message
    assert events(rooms.say("m-alice", "next", "a-2", T0))[0].seq == 3   # no seq taken


def test_a_private_line_to_oneself_is_a_bad_message():
    rooms = room_with("alice", "bob")
    out = rooms.say("m-alice", "note to self", "a-1", T0, to="Alice")
    assert [(who, e.code, e.id) for who, e in out] == [("m-alice", "bad_message", "a-1")]
    assert "someone else" in out[0][1].message


def test_help_sent_privately_is_a_private_line_not_the_help_text():
    rooms = room_with("alice", "bob")
    out = rooms.say("m-alice", "help", "a-1", T0, to="bob")
    assert recipients(out) == {"m-alice", "m-bob"} and events(out)[0].text == "help"


def test_private_lines_are_not_history_for_a_later_joiner():
    # bob leaves and someone else comes in as "bob": the first bob's private
    # lines must not reach the new one, nor anyone else who joins.
    rooms = room_with("alice", "bob")
    rooms.say("m-alice", "secret", "a-1", T0, to="bob")
    rooms.say("m-alice", "public", "a-2", T0)
    rooms.leave("m-bob", T0 + 1)
    out = rooms.join("m-bob2", "lobby", "bob", T0 + 2)
    assert [e.text for e in to(out, "m-bob2") if isinstance(e, Message)] == ["public"]


def test_a_private_resend_is_confirmed_with_its_recipient_not_doubled():
    rooms = room_with("alice", "bob", "carol")
    first = events(rooms.say("m-alice", "psst", "a-1", T0, to="bob"))[0]
    again = rooms.say("m-alice", "psst", "a-1", T0 + 1, to="bob")
    assert again == [("m-alice", first)]        # to the sender alone, to="bob" kept
    rooms.leave("m-bob", T0 + 2)                # gone since: still a confirmation
    assert rooms.say("m-alice", "psst", "a-1", T0 + 3, to="bob") == [("m-alice", first)]


def test_a_resume_gives_private_lines_to_their_two_members_only():
    rooms = room_with("alice", "bob", "carol")
    seen = rooms.room_of("m-alice").seq
    secret = events(rooms.say("m-alice", "secret", "a-1", T0, to="bob"))[0]
    public = events(rooms.say("m-carol", "public", "c-1", T0))[0]
    back = {member: to(rooms.resume(member, seen), member)
            for member in ("m-alice", "m-bob", "m-carol")}
    for member in ("m-alice", "m-bob"):
        assert back[member][1:] == [secret, public]
        assert back[member][0].missed == 2
    assert back["m-carol"][1:] == [public] and back["m-carol"][0].missed == 1


def test_a_private_line_is_forgotten_with_the_log():
    rooms = room_with("alice", "bob", log_events=2)
    rooms.say("m-alice", "secret", "a-1", T0, to="bob")
    for i in range(3):
        rooms.say("m-alice", f"m{i}", f"a-{i + 2}", T0)
    assert rooms.room_of("m-alice").private == {}


def test_a_private_line_too_big_for_the_log_leaves_nothing_behind():
    # It used to be marked private after the log had already let it go.
    rooms = room_with("alice", "bob", log_bytes=3)
    rooms.say("m-alice", "longer than the log", "a-1", T0, to="bob")
    assert rooms.room_of("m-alice").private == {}
