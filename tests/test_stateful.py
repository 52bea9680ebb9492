"""Stateful tests (hypothesis) of ROOMS and CALLS in chatroom.py (issue 13).

Hypothesis runs random sequences of joins, lines said and said again, leaves,
drops, resumes, seats expiring after the grace period, invitations, call
backs, declines, hang-ups and time passing, and checks the rules after every
step against a small model kept beside the code.

- `RoomsMachine` drives `Rooms` as the host does (HOST's seats: a dropped
  member stays in its room, what is sent to it meanwhile is lost, and it
  comes back with `resume(seen)` or is taken out after the grace period),
  with clients that keep what they received, lose what was in flight when
  they drop, and send again what was never confirmed.
- `CallsMachine` drives `Calls` through HOST RELAYS' `HostCalls` (a test
  clock instead of the event loop's timer) beside `Rooms`, so what each
  person is told is checked, not only the state.

Both layers do no I/O and take time as an argument, so nothing here touches
the network or sleeps.
"""

from __future__ import annotations

import dataclasses
import itertools
import unicodedata
from collections import Counter
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import chatroom
from chatroom import (
    PROTOCOL_VERSION,
    CallEnded,
    CallFailed,
    CallInvite,
    CallMissed,
    CallStart,
    Decline,
    Error,
    Hangup,
    Help,
    Limits,
    MediaPort,
    Members,
    Message,
    Refused,
    Resumed,
    Rooms,
    System,
    Welcome,
    id_key,
    look_key,
)

T0 = 1_700_000_000.0
HOST = "testhost"

MAX_TEXT = 40
MAX_FILE = 1234
GRACE = 15.0
SLOTS = 6                           # clients, each with a seat at a time

# IDs as typed -> who they are: (name, look), or None when refused. Two IDs
# are one when their names are equal (case, width and NFC/NFD folded, and
# look-alike letters: the Cyrillic "соре" is "cope") or when their looks are
# equal (the look is taken before case is folded: "Ian" looks like "lan",
# while "ian" does not). A Cyrillic "а" among Latin letters mixes scripts and
# is refused, as are SYSTEM and its imitations. These are ROOMS' rules.
USERS: dict[str, tuple[str, str] | None] = {
    "alice": ("alice", "alice"), "Alice": ("alice", "alice"), "ALICE": ("alice", "alice"),
    "ａｌｉｃｅ": ("alice", "alice"),
    "cope": ("cope", "cope"), "COPE": ("cope", "cope"),
    "\u0441\u043e\u0440\u0435": ("cope", "cope"),          # Cyrillic
    "Ian": ("ian", "lan"), "ian": ("ian", "ian"), "lan": ("lan", "lan"),
    "bob": ("bob", "bob"), "BoB": ("bob", "bob"),
    "Zo\u00eb": ("zoe", "zoe"), "Zoe\u0308": ("zoe", "zoe"), "ZO\u00cb": ("zoe", "zoe"),
    "李 雷": ("li lei", "li lei"),
    "\u0430lice": None, "SYSTEM": None, "S.y.s.t.e.m": None, "\u0405YSTEM": None,
    " bob": None, "": None, "a\u202eb": None, "x" * 33: None,
}
# A refused ID still names whoever it looks like, when it is typed to find
# someone (/CHECK, a file's recipient): it is only refused as one's own ID.
NAMES_AS = {"\u0430lice": ("alice", "alice")}
ROOM_IDS: dict[str, tuple[str, str] | None] = {
    "lobby": ("lobby", "lobby"), "Lobby": ("lobby", "lobby"), "ＬＯＢＢＹ": ("lobby", "lobby"),
    "Ian": ("ian", "lan"), "lan": ("lan", "lan"), "ian": ("ian", "ian"),
    "l\u043ebby": None, "a/b": None, "": None,
}


def same_id(one: tuple[str, str] | None, other: tuple[str, str] | None) -> bool:
    return one is not None and other is not None and (one[0] == other[0] or one[1] == other[1])


# Chat texts -> what becomes of them: a message, help, or the error code.
TEXTS: dict[str, str] = {
    "hi": "ok", "hello there": "ok", "[SYSTEM] fake": "ok", "tab\tand\nline": "ok",
    "x" * MAX_TEXT: "ok", "é" * (MAX_TEXT // 2): "ok", "日本語": "ok",
    "y" * (MAX_TEXT + 1): "message_too_long", "é" * (MAX_TEXT // 2 + 1): "message_too_long",
    "help": "help", " HeLp ": "help",
    "": "bad_message", "   ": "bad_message", "a\x1bb": "bad_message",
}
OK_TEXTS = sorted(t for t, fate in TEXTS.items() if fate == "ok")
# Valid IDs drawn three times as often as refused ones.
ROOM_CHOICES = [r for r in ROOM_IDS if ROOM_IDS[r]] * 3 + [r for r in ROOM_IDS if not ROOM_IDS[r]]
USER_CHOICES = [u for u in USERS if USERS[u]] * 3 + [u for u in USERS if not USERS[u]]


class Seat:
    """An opaque member handle, as the host's Seat is to Rooms and Calls."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


@dataclasses.dataclass(frozen=True)
class RoomLimits:
    """Small limits, so that rooms fill, logs overflow (by count and by size)
    and history wraps within a few dozen steps. Notices are about 30
    characters, lines at most MAX_TEXT."""
    history: int
    log_events: int
    log_bytes: int
    max_members: int


ROOM_LIMITS = [
    RoomLimits(history=4, log_events=4, log_bytes=130, max_members=3),  # history outlives log
    RoomLimits(history=1, log_events=6, log_bytes=160, max_members=4),  # log outlives history
    RoomLimits(history=0, log_events=3, log_bytes=1000, max_members=2),
    RoomLimits(history=3, log_events=50, log_bytes=70, max_members=3),  # bytes bind first
]


def expected_log(events: list, limits: RoomLimits) -> list:
    """The resume log the rules promise: the newest room events, as many as
    fit both `log_events` and `log_bytes` (of text)."""
    kept: list = []
    size = 0
    for event in reversed(events):
        if len(kept) == limits.log_events or size + len(event.text) > limits.log_bytes:
            break
        kept.append(event)
        size += len(event.text)
    return kept[::-1]


def codes(call) -> str | None:
    """The code a call is refused with, or None (and its result is dropped)."""
    try:
        call()
    except Refused as refusal:
        return refusal.code
    return None


# =============================================================================
# Rooms
# =============================================================================

@dataclasses.dataclass
class RoomModel:
    key: tuple                      # (name, look) of the first spelling
    name: str                       # the first spelling
    limits: RoomLimits
    members: dict = dataclasses.field(default_factory=dict)   # handle -> Client
    events: list = dataclasses.field(default_factory=list)    # events[i].seq == i + 1

    def users(self) -> tuple:
        return tuple(client.user for client in self.members.values())

    def history(self) -> list:
        messages = [e for e in self.events if isinstance(e, Message)]
        return messages[-self.limits.history:] if self.limits.history else []

    def log(self) -> list:
        return expected_log(self.events, self.limits)

    def resend_window(self) -> list:
        """Where a resent id is looked for: the log, then the history."""
        return self.log() + self.history()


@dataclasses.dataclass
class Client:
    """One client program: its seat (if any) and what it has received."""
    slot: int
    state: str = "out"              # out | in (connected) | away (dropped, seat held)
    handle: Any = None
    room: RoomModel | None = None
    room_raw: str = ""              # as typed, for logging in again
    user_raw: str = ""
    user: str = ""                  # display form
    label: tuple = ()               # who the user is (USERS)
    token: str = ""
    enter_seq: int = 0              # seq of its own enter notice
    away_since: float = 0.0
    got: list = dataclasses.field(default_factory=list)   # processed, in order
    seen: int = 0                   # the newest seq it has (what it says on resume)
    next_seq: int | None = None     # the seq the next live room event must have
    lost: set = dataclasses.field(default_factory=set)    # seqs counted as lost
    said: dict = dataclasses.field(default_factory=dict)  # msg id -> text
    ids: itertools.count = dataclasses.field(default_factory=lambda: itertools.count(1))

    def live(self) -> list[int]:
        """The seqs of the room events it took as new since its last Welcome."""
        seqs: list[int] = []
        seen = 0
        for event in self.got:
            if isinstance(event, Welcome):
                seqs, seen = [], 0
            elif isinstance(event, Message) and event.history:
                seen = max(seen, event.seq)
            elif isinstance(event, (Message, System)) and event.seq > seen:
                seqs.append(event.seq)
                seen = event.seq
        return seqs

    def replay_seen(self) -> int:
        """`seen` as the client computes it from what it has (after a drop)."""
        seen = 0
        for event in self.got:
            if isinstance(event, Welcome):
                seen = 0
            elif isinstance(event, (Message, System)):
                seen = max(seen, event.seq)
        return seen

    def pending(self) -> dict:
        """Lines said and not confirmed (the echo, or an error naming them)."""
        done = {e.id for e in self.got if isinstance(e, Error)}
        done |= {e.id for e in self.got
                 if isinstance(e, Message) and id_key(e.sender) == id_key(self.user)}
        return {i: t for i, t in self.said.items() if i not in done}


class RoomsMachine(RuleBasedStateMachine):
    """Rooms as the host drives it, with seats held across drops."""

    def __init__(self) -> None:
        super().__init__()
        self.limits = ROOM_LIMITS[0]
        self.rooms = Rooms()
        self.now = T0
        self.model: dict[str, RoomModel] = {}         # key -> room
        self.clients = [Client(slot) for slot in range(SLOTS)]
        self.seated: dict[Any, Client] = {}           # current handles -> client
        self.gone: list[Any] = []                     # handles that left, for ever
        self.handles = itertools.count(1)

    # --- helpers -----------------------------------------------------------

    def slots(self, *states: str) -> list[int]:
        return [c.slot for c in self.clients if c.state in states]

    def tick(self) -> float:
        self.now += 0.25
        return self.now

    def post(self, deliveries: list, *, fresh: Any = None, old_ok: Any = None) -> None:
        """What the host would send: only to members that are seated now, each
        room event only to members of its room and identical to the one the
        room made; a connected client takes it (a held seat's is lost)."""
        for handle, event in deliveries:
            client = self.seated.get(handle)
            assert client is not None, f"{event!r} went to {handle!r}, who has no seat"
            if isinstance(event, (Message, System)):
                room = client.room
                assert 1 <= event.seq <= len(room.events), (event, room.name)
                made = room.events[event.seq - 1]
                if isinstance(event, Message) and handle is old_ok and not event.history:
                    # a resend confirmed again: the same seq, id, sender and time
                    # (its text is what was sent now, the id's owner's business)
                    assert (event.seq, event.id, event.sender, event.ts) == \
                        (made.seq, made.id, made.sender, made.ts), (event, made)
                elif isinstance(event, Message) and event.history:
                    assert dataclasses.replace(event, history=False) == made
                else:
                    assert event is made, f"{handle!r} in {room.name!r} got {event!r}"
            if client.state == "away":
                continue                    # the connection is gone: lost
            client.got.append(event)
            if isinstance(event, Message) and event.history:
                client.seen = max(client.seen, event.seq)
            elif isinstance(event, (Message, System)):
                if event.seq <= client.seen:
                    # Only a resent line's confirmation, or a resume asked from
                    # further back, may bring a room event the client has.
                    assert handle is old_ok, f"{handle!r} got {event!r} twice"
                    continue
                if client.next_seq is not None:
                    assert event.seq == client.next_seq, (handle, event, client.next_seq)
                elif handle is not fresh:
                    raise AssertionError(f"{handle!r} got {event!r} out of nowhere")
                client.seen = event.seq
                client.next_seq = event.seq + 1

    def notice(self, room: RoomModel, out: list, kind: str, user: str, text: str) -> None:
        """`out` is one new notice, to every member in join order."""
        assert [h for h, _ in out] == list(room.members), out
        notice = out[0][1]
        assert all(e is notice for _, e in out)
        assert notice == System(len(room.events) + 1, kind, user, text, self.now)
        room.events.append(notice)

    def say(self, client: Client, text: str, msg_id: str) -> None:
        """`client` says `text` with `msg_id` (first time or again)."""
        room, handle = client.room, client.handle
        fate = TEXTS[text]
        out = self.rooms.say(handle, text, msg_id, self.tick())
        if fate == "help":
            assert len(out) == 1 and out[0][0] is handle and isinstance(out[0][1], Help)
            return
        if fate != "ok":
            assert out == [(handle, out[0][1])] and isinstance(out[0][1], Error)
            assert (out[0][1].code, out[0][1].id) == (fate, msg_id)
            client.said.setdefault(msg_id, text)
            self.post(out)
            return
        client.said.setdefault(msg_id, text)
        earlier = next((e for e in room.events if isinstance(e, Message)
                        and e.id == msg_id and id_key(e.sender) == id_key(client.user)), None)
        if earlier is not None:         # a resend: confirmed again to the sender alone,
            again = out[0][1]           # however long ago (never doubled)
            assert len(out) == 1 and out[0][0] is handle and isinstance(again, Message), out
            assert (again.seq, again.id, again.sender, again.ts) == \
                (earlier.seq, earlier.id, earlier.sender, earlier.ts), (again, earlier)
            self.post(out, old_ok=handle)
            return
        assert [h for h, _ in out] == list(room.members), out
        message = out[0][1]
        assert all(e is message for _, e in out)
        assert message == Message(len(room.events) + 1, msg_id, client.user, text, self.now)
        room.events.append(message)
        self.post(out)

    def find_room(self, key: tuple[str, str] | None) -> RoomModel | None:
        """The open room an ID names: by name, else by look."""
        return None if key is None else (
            next((r for r in self.model.values() if r.key[0] == key[0]), None)
            or next((r for r in self.model.values() if r.key[1] == key[1]), None))

    def sit_down(self, client: Client, room_raw: str, user_raw: str, token: str) -> bool:
        """A login: join, checked against the rules; True when seated."""
        handle = Seat(f"seat{client.slot}.{next(self.handles)}")
        room_key, label = ROOM_IDS[room_raw], USERS[user_raw]
        room = self.find_room(room_key)
        expected = None
        if room_key is None:
            expected = "bad_room_id"
        elif label is None:
            expected = "bad_user_id"
        elif room is not None and any(same_id(label, c.label) for c in room.members.values()):
            expected = "user_taken"     # a held seat's name too
        elif room is not None and len(room.members) >= self.limits.max_members:
            expected = "room_full"
        now = self.tick()
        try:
            out = self.rooms.join(handle, room_raw, user_raw, now, token)
        except Refused as refusal:
            assert refusal.code == expected, (room_raw, user_raw, refusal)
            assert self.rooms.room_of(handle) is None
            return False
        assert expected is None, (room_raw, user_raw, expected)
        if room is None:
            room = self.model[room_key] = RoomModel(room_key, nfc(room_raw), self.limits)
        user = nfc(user_raw)
        welcome = Welcome(PROTOCOL_VERSION, room.name, user, (*room.users(), user), HOST,
                          MAX_FILE, token, GRACE if token else 0)
        history = [(handle, dataclasses.replace(m, history=True)) for m in room.history()]
        assert out[:1 + len(history)] == [(handle, welcome), *history], out
        client.state, client.handle, client.room = "in", handle, room
        client.room_raw, client.user_raw, client.user, client.label = \
            room_raw, user_raw, user, label
        client.token, client.next_seq, client.seen, client.lost = token, None, 0, set()
        room.members[handle] = client
        self.seated[handle] = client
        self.notice(room, out[1 + len(history):], "enter", user,
                    f"[SYSTEM] {user} entered the room")
        client.enter_seq = len(room.events)
        self.post(out, fresh=handle)
        return True

    def unseat(self, client: Client, why: str) -> None:
        """`client`'s seat leaves its room: by bye, or after the grace period."""
        room, handle = client.room, client.handle
        out = self.rooms.leave(handle, self.tick(), why)
        del room.members[handle]
        del self.seated[handle]
        self.gone.append(handle)
        client.state, client.handle = "out", None
        if not room.members:                    # the last one out: forgotten
            assert out == []
            del self.model[room.key]
            return
        text = f"[SYSTEM] {client.user} left the room" + (f" ({why})" if why else "")
        self.notice(room, out, "leave", client.user, text)
        self.post(out)

    # --- rules -------------------------------------------------------------------

    @initialize(limits=st.sampled_from(ROOM_LIMITS))
    def open_host(self, limits):
        self.limits = limits
        self.rooms = Rooms(host_name=HOST, history_limit=limits.history,
                           max_message_bytes=MAX_TEXT, max_members=limits.max_members,
                           max_file_size=MAX_FILE, grace_s=GRACE,
                           log_events=limits.log_events, log_bytes=limits.log_bytes)

    @precondition(lambda self: self.slots("out"))
    @rule(data=st.data(), room=st.sampled_from(ROOM_CHOICES),
          user=st.sampled_from(USER_CHOICES), held=st.booleans())
    def join(self, data, room, user, held):
        client = self.clients[data.draw(st.sampled_from(self.slots("out")), label="slot")]
        client.got, client.said = [], {}        # a new client program
        self.sit_down(client, room, user, f"token-{next(self.handles)}" if held else "")

    @precondition(lambda self: any(c.state == "out" and c.user_raw for c in self.clients))
    @rule(data=st.data())
    def log_in_again(self, data):
        """The host forgot the seat (or the client left): the same client logs
        in with the same IDs and sends again what was never confirmed."""
        client = self.clients[data.draw(st.sampled_from(
            [c.slot for c in self.clients if c.state == "out" and c.user_raw]), label="slot")]
        pending = client.pending()
        if self.sit_down(client, client.room_raw, client.user_raw, f"token-{next(self.handles)}"):
            for msg_id, text in pending.items():
                self.say(client, text, msg_id)

    @precondition(lambda self: self.slots("in"))
    @rule(data=st.data(), text=st.sampled_from(sorted(TEXTS)), shared_id=st.booleans())
    def say_something(self, data, text, shared_id):
        client = self.clients[data.draw(st.sampled_from(self.slots("in")), label="slot")]
        # Ids are the client's own, or one every client uses (another sender's
        # line with the same id is a new line).
        msg_id = "same-id" if shared_id else f"c{client.slot}-{next(client.ids)}"
        self.say(client, text, msg_id)

    @precondition(lambda self: self.slots("in"))
    @rule(data=st.data(), lines=st.integers(1, 5))
    def chatter(self, data, lines):
        """A busy room: a few lines from members that are connected, some of
        them sent again (a client that did not see them confirmed)."""
        for _ in range(lines):
            client = self.clients[data.draw(st.sampled_from(self.slots("in")), label="slot")]
            if client.said and data.draw(st.booleans(), label="again"):
                msg_id = data.draw(st.sampled_from(list(client.said)[-3:]), label="msg id")
                self.say(client, client.said[msg_id], msg_id)
            else:
                text = data.draw(st.sampled_from(OK_TEXTS), label="text")
                self.say(client, text, f"c{client.slot}-{next(client.ids)}")

    @precondition(lambda self: any(c.state == "in" and c.said for c in self.clients))
    @rule(data=st.data())
    def say_again(self, data):
        """A line sent again with its id (a client that never saw it confirmed)."""
        client = self.clients[data.draw(st.sampled_from(
            [c.slot for c in self.clients if c.state == "in" and c.said]), label="slot")]
        msg_id = data.draw(st.sampled_from(list(client.said)[-3:]), label="msg id")  # recent
        self.say(client, client.said[msg_id], msg_id)

    @precondition(lambda self: self.slots("away"))
    @rule(data=st.data(), text=st.sampled_from(OK_TEXTS))
    def type_while_away(self, data, text):
        """Typed with no connection: kept by the client, sent on its return."""
        client = self.clients[data.draw(st.sampled_from(self.slots("away")), label="slot")]
        client.said[f"c{client.slot}-{next(client.ids)}"] = text

    @precondition(lambda self: self.slots("in"))
    @rule(data=st.data(), in_flight=st.integers(0, 8))
    def drop(self, data, in_flight):
        """The connection just goes: the host holds the seat; the last
        `in_flight` events it was sent never reached the client."""
        client = self.clients[data.draw(st.sampled_from(self.slots("in")), label="slot")]
        last_login = max(i for i, e in enumerate(client.got) if isinstance(e, (Welcome, Resumed)))
        cut = max(last_login + 1, len(client.got) - in_flight)
        client.got = client.got[:cut]
        client.seen = client.replay_seen()
        client.state, client.away_since = "away", self.tick()

    @precondition(lambda self: self.slots("away"))
    @rule(data=st.data(), honest=st.sampled_from([True, True, True, False]))
    def come_back(self, data, honest):
        """Back within the grace period with the token: Resumed, then every
        room event after `seen` that the log still has, then the client sends
        again what it never saw confirmed. A client that lost track of what it
        had says seen=0 (then it drops by seq what it already has)."""
        client = self.clients[data.draw(st.sampled_from(self.slots("away")), label="slot")]
        room, handle = client.room, client.handle
        seen = client.seen if honest else 0
        out = self.rooms.resume(handle, seen)
        after = [e for e in room.log() if e.seq > seen]
        first_kept = after[0].seq if after else len(room.events) + 1
        lost = max(0, first_kept - seen - 1)
        # Every room event after `seen` comes, or is counted as lost.
        assert len(after) + lost == max(0, len(room.events) - seen)
        resumed = out[0][1]
        assert out[0][0] is handle and isinstance(resumed, Resumed), out[0]
        assert (resumed.room, resumed.user, resumed.members, resumed.host,
                resumed.max_file_size, resumed.missed, resumed.lost) == \
            (room.name, client.user, room.users(), HOST, MAX_FILE, len(after), lost), resumed
        assert len(out) == 1 + len(after)
        assert all(h is handle and e is kept for (h, e), kept in zip(out[1:], after))
        pending = client.pending()
        live = set(client.live())
        client.lost |= set(range(seen + 1, first_kept)) - live
        client.state = "in"
        client.next_seq = max(client.seen + 1, first_kept)
        self.post(out, old_ok=None if honest else handle)
        for msg_id, text in pending.items():
            self.say(client, text, msg_id)

    @precondition(lambda self: self.slots("in"))
    @rule(data=st.data())
    def leave(self, data):
        """bye: the room is told at once, the seat is not held."""
        client = self.clients[data.draw(st.sampled_from(self.slots("in")), label="slot")]
        self.unseat(client, "")
        client.user_raw = ""                    # it left on purpose: no coming back

    @rule(dt=st.sampled_from([1.0, 5.0, GRACE - 1, GRACE + 1, 3 * GRACE]))
    def time_passes(self, dt):
        """The host's tick: held seats older than the grace period go."""
        self.now += dt
        for client in self.clients:
            if client.state == "away" and self.now - client.away_since > GRACE:
                self.unseat(client, "connection lost")

    @precondition(lambda self: self.slots("in"))
    @rule(data=st.data(), to=st.sampled_from(["", *sorted(USERS)]),
          room_raw=st.sampled_from(sorted(ROOM_IDS)))
    def queries(self, data, to, room_raw):
        """/who, a file's recipients and a lookup, from a connected member;
        a seated handle can't join again; leaving without a seat does nothing."""
        client = self.clients[data.draw(st.sampled_from(self.slots("in")), label="slot")]
        handle, room = client.handle, client.room
        assert codes(lambda: self.rooms.join(handle, room_raw, "dave", self.now)) == "bad_frame"
        assert self.rooms.leave(Seat("stranger"), self.now) == []
        if self.gone:
            assert self.rooms.leave(self.gone[-1], self.now) == []
        assert self.rooms.who(handle) == [(handle, Members(room.users()))]
        # Found by name first, else by look.
        wanted = (USERS[to] or NAMES_AS.get(to)) if to else None
        named = [h for h, c in room.members.items() if wanted and c.label[0] == wanted[0]] \
            or [h for h, c in room.members.items() if wanted and c.label[1] == wanted[1]]
        if not to:
            others = [h for h in room.members if h is not handle]
            expected: Any = others or "no_such_user"
        else:
            expected = [named[0]] if named and named[0] is not handle else "no_such_user"
        try:
            assert self.rooms.recipients(handle, to) == expected
        except Refused as refusal:
            assert refusal.code == expected
        if to:
            try:
                assert self.rooms.lookup(handle, to) is named[0]
            except Refused as refusal:
                assert refusal.code == "no_such_user" and not named

    # --- invariants ----------------------------------------------------------------

    @invariant()
    def rooms_match_the_model(self):
        assert len(self.rooms) == len(self.model)
        assert sorted(self.rooms.summary()) == sorted(
            (room.name, len(room.members)) for room in self.model.values())
        for room in self.model.values():
            real = self.rooms.room_of(next(iter(room.members)))
            assert real.name == room.name
            assert list(real.members) == list(room.members)     # join order
            assert all(self.rooms.room_of(h) is real for h in room.members)
            # One member per user ID in a room, however it is spelt.
            for key in (id_key, look_key):
                keys = [key(m.user) for m in real.members.values()]
                assert len(set(keys)) == len(keys)
            assert dict(real.by_key) == {id_key(c.user): h for h, c in room.members.items()}
            assert dict(real.by_look) == {look_key(c.user): h for h, c in room.members.items()}
            assert [m.user for m in real.members.values()] == list(room.users())
            # Sequence numbers: one per room event, from 1, never reused.
            assert real.seq == len(room.events)
            log = list(real.log)
            assert len(log) == len(room.log())
            assert all(a is b for a, b in zip(log, room.log()))
            assert [e.seq for e in log] == list(range(real.seq - len(log) + 1, real.seq + 1))
            assert real.log_bytes == sum(len(e.text) for e in log) <= self.limits.log_bytes
            assert len(log) <= self.limits.log_events
            assert list(real.history) == room.history()

    @invariant()
    def seats_are_where_they_should_be(self):
        for client in self.clients:
            if client.state == "out":
                continue
            assert self.rooms.user_of(client.handle) == client.user
            assert client.handle in client.room.members
        for handle in self.gone[-10:]:
            assert self.rooms.room_of(handle) is None and handle not in self.seated

    @invariant()
    def connected_clients_miss_nothing(self):
        """Everything of its room since it entered, once, in order: what a
        connected client holds, with what it was told it lost, covers it."""
        for client in self.clients:
            if client.state != "in":
                continue
            live = client.live()
            assert live == sorted(set(live))
            assert not live or live[-1] == len(client.room.events)
            missing = set(range(client.enter_seq, len(client.room.events) + 1)) \
                - set(live) - client.lost
            assert not missing, (client.slot, sorted(missing))


RoomsMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                          deadline=None)
test_rooms_state_machine = RoomsMachine.TestCase


# =============================================================================
# Calls
# =============================================================================

CALL_TIMEOUT = 10.0
CALL_GRACE = 15.0
PEOPLE = 6
CODECS = [("vp8", "jpeg", "opus", "pcm"), ("jpeg", "pcm"), ("vp8", "opus"), ("jpeg", "opus")]


class FakeTransport:
    def __init__(self, address: str) -> None:
        self.address = address

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.address, 40000) if name == "peername" else default


class FakeLink:
    def __init__(self, address: str) -> None:
        self.transport = FakeTransport(address)


class Person(Seat):
    """A seat with what HostCalls reads of it: its connection's address."""

    def __init__(self, name: str, address: str) -> None:
        super().__init__(name)
        self.link = FakeLink(address)


class ClockedHostCalls(chatroom.HostCalls):
    """HostCalls on the test's clock: instead of arming the event loop's
    timer for the next invitation's deadline, it notes it in `timer`, and
    the test calls `fire()` when that time comes, as the loop would."""

    def __init__(self, limits: Limits, rooms: Rooms, deliver, clock) -> None:
        self.clock = clock
        self.timer: float | None = None
        super().__init__(limits, rooms, deliver)

    def _now(self) -> float:
        return self.clock()

    def _schedule_expiry(self) -> None:
        self.timer = self.calls.next_deadline()

    def fire(self) -> None:
        self.timer = None
        self._tell(self.calls.expire(self._now()))


@dataclasses.dataclass
class Caller:
    slot: int
    state: str = "out"              # out | in | away
    handle: Any = None
    room: str = ""
    port: int = 0
    codecs: tuple = ()
    away_since: float = 0.0

    @property
    def user(self) -> str:
        return f"p{self.slot}"


def shared(mine: tuple, theirs: tuple, kinds: tuple) -> str:
    return next((c for c in mine if c in theirs and c in kinds), "")


class CallsMachine(RuleBasedStateMachine):
    """Calls between members of rooms, as the host runs them."""

    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.max_size = 6
        self.people = [Caller(slot) for slot in range(PEOPLE)]
        self.by_handle: dict[Any, Caller] = {}
        self.gone: list[Any] = []
        self.invites: dict[tuple, float] = {}         # (caller, callee) handles -> deadline
        self.links: set[frozenset] = set()
        self.outbox: list = []
        self.handles = itertools.count(1)

    # --- helpers -----------------------------------------------------------

    def slots(self, *states: str) -> list[int]:
        return [p.slot for p in self.people if p.state in states]

    def deliver(self, deliveries: list) -> None:
        self.outbox += deliveries

    def take(self) -> list:
        out, self.outbox = self.outbox, []
        return out

    def group(self, handle: Any) -> set:
        found, frontier = {handle}, [handle]
        while frontier:
            one = frontier.pop()
            for link in self.links:
                if one in link:
                    (other,) = link - {one}
                    if other not in found:
                        found.add(other)
                        frontier.append(other)
        return found

    def target(self, me: Caller, slot: int) -> Any:
        """The handle `me` reaches by typing slot's user ID, or None."""
        other = self.people[slot]
        return other.handle if other.state != "out" and other.room == me.room else None

    def told(self, *expected: tuple) -> None:
        """The call events of the last request: exactly these (handle, what)
        pairs, in any order, each once, to the people concerned only."""
        got = []
        starts: dict[str, list] = {}
        for handle, event in self.take():
            assert handle in self.by_handle, f"{event!r} went to {handle!r}, who has no seat"
            if isinstance(event, CallInvite):
                got.append((handle, "invite", event.sender, event.expires))
            elif isinstance(event, CallMissed):
                got.append((handle, "missed", event.sender))
            elif isinstance(event, (CallFailed, CallEnded)):
                got.append((handle, type(event).__name__, event.peer, event.reason))
            elif isinstance(event, CallStart):
                got.append((handle, "start", event.peer, event.address, event.port, event.side,
                            event.video, event.audio))
                starts.setdefault(event.link, []).append(event)
            elif isinstance(event, Error):
                got.append((handle, "error", event.code))
            else:
                raise AssertionError(f"{handle!r} was sent {event!r}")
        assert Counter(got) == Counter(expected), (sorted(map(repr, got)),
                                                   sorted(map(repr, expected)))
        for link_id, pair in starts.items():    # one fresh id and key per link
            assert len(pair) == 2 and pair[0].key == pair[1].key != "", pair
            assert {pair[0].side, pair[1].side} == {"a", "b"}
            media = self.hc.links[bytes.fromhex(link_id)]
            assert {media.a, media.b} == {h for h, e in self.by_handle.items()
                                          if e.user in (pair[0].peer, pair[1].peer)}

    def start(self, a: Any, b: Any) -> list:
        pa, pb = self.by_handle[a], self.by_handle[b]
        video = shared(pa.codecs, pb.codecs, chatroom.VIDEO_CODECS)
        audio = shared(pa.codecs, pb.codecs, chatroom.AUDIO_CODECS)
        return [(a, "start", pb.user, b.link.transport.address, pb.port, "a", video, audio),
                (b, "start", pa.user, a.link.transport.address, pa.port, "b", video, audio)]

    def link(self, a: Any, b: Any) -> list:
        self.links.add(frozenset((a, b)))
        self.invites.pop((a, b), None)          # answered by the link
        self.invites.pop((b, a), None)
        return self.start(a, b)

    def unlink(self, a: Any, b: Any, reason: str) -> list:
        self.links.discard(frozenset((a, b)))
        return [(a, "CallEnded", self.by_handle[b].user, reason),
                (b, "CallEnded", self.by_handle[a].user, reason)]

    def name(self, handle: Any) -> str:
        return self.by_handle[handle].user

    def end_all(self, me: Caller, reason: str) -> list:
        """What CALLS says when `me` leaves the room or its seat expires."""
        h = me.handle
        expected = []
        for (caller, callee) in list(self.invites):
            if caller is h:
                del self.invites[(caller, callee)]
                expected.append((callee, "missed", me.user))
            elif callee is h:
                del self.invites[(caller, callee)]
                expected.append((caller, "CallFailed", me.user, reason))
        for link in list(self.links):
            if h in link:
                (other,) = link - {h}
                expected += self.unlink(h, other, reason)
        return expected

    def unseat(self, me: Caller, why: str) -> None:
        """As HOST does: calls end first (names still known), then the room."""
        self.hc.forget(me.handle, "left" if why == "" else "lost")
        self.told(*self.end_all(me, "left" if why == "" else "lost"))
        out = self.rooms.leave(me.handle, self.now, why)
        assert all(self.by_handle[h].room == me.room and h is not me.handle for h, _ in out)
        del self.by_handle[me.handle]
        self.gone.append(me.handle)
        me.state, me.handle = "out", None

    # --- rules -------------------------------------------------------------------

    @initialize(max_size=st.sampled_from([2, 3, 4]),
                seated=st.lists(st.sampled_from(["a", "a", "b", ""]),
                                min_size=PEOPLE, max_size=PEOPLE))
    def open_host(self, max_size, seated):
        """A host, and people already in its rooms ("": not yet)."""
        self.max_size = max_size
        self.rooms = Rooms(host_name=HOST, grace_s=CALL_GRACE)
        self.hc = ClockedHostCalls(Limits(call_timeout_s=CALL_TIMEOUT, max_call_size=max_size),
                                   self.rooms, self.deliver, lambda: self.now)
        for me, room in zip(self.people, seated):
            if room:
                self.sit_down(me, room, True, CODECS[me.slot % len(CODECS)])

    @precondition(lambda self: self.slots("out"))
    @rule(data=st.data(), room=st.sampled_from(["a", "a", "b"]), media=st.booleans(),
          codecs=st.sampled_from(CODECS))
    def join(self, data, room, media, codecs):
        self.sit_down(self.people[data.draw(st.sampled_from(self.slots("out")), label="slot")],
                      room, media, codecs)

    def sit_down(self, me: Caller, room: str, media: bool, codecs: tuple) -> None:
        n = next(self.handles)
        me.handle = Person(f"{me.user}.{n}", f"10.0.0.{n}")
        out = self.rooms.join(me.handle, room, me.user, self.now)
        me.state, me.room = "in", room
        self.by_handle[me.handle] = me
        assert all(self.by_handle[h].room == room for h, _ in out)
        me.port, me.codecs = 0, ()
        if media:                               # a client with no media port takes calls too
            me.port, me.codecs = 50000 + n, codecs
            self.hc.on_media_port(me.handle, MediaPort(me.port, codecs))

    @precondition(lambda self: self.slots("in"))
    @rule(data=st.data(), whom=st.integers(0, PEOPLE - 1), upper=st.booleans())
    def check(self, data, whom, upper):
        """/CHECK someone (anyone: in the room or not, oneself)."""
        me = self.people[data.draw(st.sampled_from(self.slots("in")), label="slot")]
        self.check_user(me, whom, upper)

    @precondition(lambda self: any(self.by_handle[callee].state == "in"
                                   for _, callee in self.invites))
    @rule(data=st.data(), upper=st.booleans())
    def call_back(self, data, upper):
        """/CHECK back someone who calls me: connect (or call_full)."""
        caller, callee = data.draw(st.sampled_from(sorted(
            (pair for pair in self.invites if self.by_handle[pair[1]].state == "in"),
            key=repr)), label="invitation")
        self.check_user(self.by_handle[callee], self.by_handle[caller].slot, upper)

    @precondition(lambda self: len(self.slots("in")) >= 2)
    @rule(data=st.data(), upper=st.booleans())
    def check_a_neighbour(self, data, upper):
        """/CHECK someone in my room."""
        me = self.people[data.draw(st.sampled_from(self.slots("in")), label="slot")]
        neighbours = [p.slot for p in self.people
                      if p.state != "out" and p.room == me.room and p is not me]
        if neighbours:
            self.check_user(me, data.draw(st.sampled_from(neighbours), label="whom"), upper)

    def check_user(self, me: Caller, whom: int, upper: bool) -> None:
        """`me` types /CHECK and `whom`'s user ID: invite, or answer."""
        typed = self.people[whom].user.upper() if upper else self.people[whom].user
        self.hc.on_call(me.handle, chatroom.Call(typed))
        x, y = me.handle, self.target(me, whom)
        if y is None:
            self.told((x, "error", "no_such_user"))
        elif y is x:
            self.told((x, "error", "call_self"))
        elif frozenset((x, y)) in self.links:
            self.told((x, "error", "already_in_call"))
        elif (y, x) in self.invites:            # a call back: connect
            del self.invites[(y, x)]
            mine, theirs = self.group(y), self.group(x)
            if x in mine:                       # one call already: just these two
                self.told(*self.link(y, x))
            elif len(mine) + len(theirs) > self.max_size:
                self.told((x, "CallFailed", self.name(y), "call_full"),
                          (y, "CallFailed", me.user, "call_full"))
            else:
                self.told(*[item for a in mine for b in theirs for item in self.link(a, b)])
        else:                                   # a new invitation, or renewed
            self.invites[(x, y)] = self.now + CALL_TIMEOUT
            self.told((y, "invite", me.user, CALL_TIMEOUT))

    @precondition(lambda self: self.slots("in"))
    @rule(data=st.data(), whom=st.integers(0, PEOPLE - 1))
    def decline(self, data, whom):
        me = self.people[data.draw(st.sampled_from(self.slots("in")), label="slot")]
        callers = sorted(self.by_handle[a].slot for a, b in self.invites if b is me.handle)
        if callers and data.draw(st.booleans(), label="someone calling me"):
            whom = data.draw(st.sampled_from(callers), label="whom")
        self.hc.on_decline(me.handle, Decline(self.people[whom].user))
        x, y = me.handle, self.target(me, whom)
        if y is None:
            self.told((x, "error", "no_such_user"))
        elif (y, x) in self.invites:
            del self.invites[(y, x)]
            self.told((y, "CallFailed", me.user, "declined"))
        else:
            self.told((x, "error", "no_invitation"))

    @precondition(lambda self: self.slots("in"))
    @rule(data=st.data(), whom=st.one_of(st.none(), st.integers(0, PEOPLE - 1)),
          reason=st.sampled_from(["hangup", "lost", "other"]))
    def hangup(self, data, whom, reason):
        """/hangup someone, or /hangup (everyone; invitations are withdrawn)."""
        me = self.people[data.draw(st.sampled_from(self.slots("in")), label="slot")]
        x = me.handle
        peers = sorted(self.by_handle[p].slot for p in self.hc.calls.peers(x))
        if whom is not None and peers and data.draw(st.booleans(), label="a peer"):
            whom = data.draw(st.sampled_from(peers), label="whom")
        self.hc.on_hangup(x, Hangup("" if whom is None else self.people[whom].user, reason))
        reason = reason if reason in ("hangup", "lost") else "hangup"
        if whom is None:
            targets = [other for link in self.links if x in link for other in link - {x}]
            targets += [callee for (caller, callee) in self.invites if caller is x]
        else:
            targets = [self.target(me, whom)]
            if targets[0] is None:
                self.told((x, "error", "no_such_user"))
                return
        expected: list = []
        for t in targets:
            if self.invites.pop((x, t), None) is not None:
                expected += [(t, "missed", me.user), (x, "CallFailed", self.name(t), "cancelled")]
            if frozenset((x, t)) in self.links:
                expected += self.unlink(x, t, reason)
        self.told(*expected or [(x, "error", "not_in_call")])

    @precondition(lambda self: self.slots("in"))
    @rule(data=st.data())
    def leave(self, data):
        """bye: every link and invitation of it ends (`left`)."""
        self.unseat(self.people[data.draw(st.sampled_from(self.slots("in")), label="slot")], "")

    @precondition(lambda self: self.slots("in"))
    @rule(data=st.data())
    def drop(self, data):
        """A short drop changes nothing in calls (their media does not go
        through the host's connection)."""
        me = self.people[data.draw(st.sampled_from(self.slots("in")), label="slot")]
        me.state, me.away_since = "away", self.now

    @precondition(lambda self: self.slots("away"))
    @rule(data=st.data())
    def come_back(self, data):
        me = self.people[data.draw(st.sampled_from(self.slots("away")), label="slot")]
        self.rooms.resume(me.handle, 0)
        me.state = "in"
        self.told()

    @rule(dt=st.sampled_from([0.5, 3.0, CALL_TIMEOUT - 0.5, CALL_TIMEOUT, CALL_TIMEOUT + 0.5,
                              CALL_GRACE + 1]))
    def time_passes(self, dt):
        """The loop runs the invitation timer at each deadline; the host's
        tick takes out seats held longer than the grace period."""
        end = self.now + dt
        while self.hc.timer is not None and self.hc.timer <= end:
            self.now = self.hc.timer
            due = sorted((pair for pair, deadline in self.invites.items()
                          if deadline <= self.now), key=repr)
            self.hc.fire()
            # Nothing due is left, and the timer is armed for what is next.
            assert self.hc.timer is None or self.hc.timer > self.now, self.hc.timer
            expected = []
            for caller, callee in due:
                del self.invites[(caller, callee)]
                expected += [(callee, "missed", self.name(caller)),
                             (caller, "CallFailed", self.name(callee), "busy")]
            assert due, "the timer fired for nothing"
            self.told(*expected)
        self.now = end
        for me in self.people:
            if me.state == "away" and self.now - me.away_since > CALL_GRACE:
                self.unseat(me, "connection lost")

    # --- invariants ----------------------------------------------------------------

    @invariant()
    def calls_match_the_model(self):
        calls = self.hc.calls
        seated = list(self.by_handle)
        for a, b in itertools.product(seated + self.gone[-6:], repeat=2):
            assert calls.linked(a, b) == (frozenset((a, b)) in self.links), (a, b)
            assert calls.invited(a, b) == ((a, b) in self.invites), (a, b)
        for h in seated:
            peers = calls.peers(h)
            assert h not in peers and len(set(peers)) == len(peers)
            assert all(h in calls.peers(p) for p in peers)              # symmetric
            group = calls.group(h)
            assert set(group) == self.group(h) and group[0] is h
            assert len(group) <= self.max_size                          # never too big
            # One call per person: everyone in my call has my call.
            assert all(set(calls.group(p)) == set(group) for p in group)
            # Calls and invitations stay inside a room.
            assert all(self.by_handle[p].room == self.by_handle[h].room for p in group)
        for (caller, callee) in self.invites:
            assert self.by_handle[caller].room == self.by_handle[callee].room

    @invariant()
    def no_invitation_outlives_its_timeout(self):
        deadline = self.hc.calls.next_deadline()
        assert deadline == min(self.invites.values(), default=None)
        assert deadline is None or deadline > self.now
        assert self.hc.timer == deadline        # the host's timer is armed for it

    @invariant()
    def the_host_keeps_one_media_link_per_link(self):
        pairs = Counter(frozenset((m.a, m.b)) for m in self.hc.links.values())
        assert pairs == Counter(self.links)     # each link once, no stale ones

    @invariant()
    def people_who_left_are_in_no_call(self):
        for h in self.gone[-6:]:
            assert self.hc.calls.peers(h) == [] and h not in self.hc.ports
            assert not any(self.hc.calls.invited(h, other) or self.hc.calls.invited(other, h)
                           for other in self.by_handle)


CallsMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=50,
                                          deadline=None)
test_calls_state_machine = CallsMachine.TestCase
