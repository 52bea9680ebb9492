"""Section 4 of chatroom.py: the rules of calls, as a pure state machine.

Plain calls with a clock passed in: invitations and their timeout, decline,
call back, groups (joining a call in progress, merging, the size limit),
hang up one or all, leaving the room. Hypothesis drives random sequences of
requests and checks the invariants after every step.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatroom import Calls, Invited, Linked, Missed, Refusal, Refused, TooMany, Unlinked

T0 = 1_000.0


class User:
    """An opaque handle, as the host's Session is to Calls."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


A, B, C, D, E, F, G = (User(n) for n in "ABCDEFG")


def pairs(news) -> set:
    """The links a list of news makes, as frozensets."""
    return {frozenset((n.a, n.b)) for n in news if isinstance(n, Linked)}


def connect(calls: Calls, x: User, y: User, now: float = T0) -> list:
    assert calls.call(x, y, now) == [Invited(x, y)]
    return calls.call(y, x, now + 1)


# --- invitations ------------------------------------------------------------

def test_check_invites_only_the_callee_and_calling_back_connects():
    calls = Calls(timeout_s=60)
    assert calls.call(A, B, T0) == [Invited(A, B)]
    assert calls.invited(A, B) and not calls.linked(A, B)
    assert calls.call(B, A, T0 + 59.9) == [Linked(A, B)]
    assert calls.linked(A, B) and calls.linked(B, A)
    assert not calls.invited(A, B) and calls.next_deadline() is None


def test_no_answer_within_the_timeout_means_busy_and_the_invitation_is_gone():
    calls = Calls(timeout_s=60)
    calls.call(A, B, T0)
    assert calls.next_deadline() == T0 + 60
    assert calls.expire(T0 + 59.999) == []
    assert calls.expire(T0 + 60) == [Missed(A, B, "busy")]
    assert calls.expire(T0 + 61) == []
    # Bob's later /CHECK alice is a new invitation, not an answer.
    assert calls.call(B, A, T0 + 61) == [Invited(B, A)]


def test_a_call_back_after_the_deadline_is_a_new_invitation_even_before_the_timer():
    """The host's expiry timer may not have run yet when a call-back comes
    in after the deadline: it is too late all the same (found by
    tests/test_stateful.py's author)."""
    calls = Calls(timeout_s=60)
    calls.call(A, B, T0)
    assert calls.call(B, A, T0 + 61) == [Missed(A, B, "busy"), Invited(B, A)]
    assert not calls.linked(A, B) and calls.invited(B, A)


def test_calling_again_renews_the_invitation():
    calls = Calls(timeout_s=10)
    calls.call(A, B, T0)
    assert calls.call(A, B, T0 + 8) == [Invited(A, B)]          # told again
    assert calls.expire(T0 + 12) == []
    assert calls.expire(T0 + 18) == [Missed(A, B, "busy")]


def test_decline_refuses_at_once():
    calls = Calls()
    calls.call(A, B, T0)
    assert calls.decline(B, A) == [Refusal(A, B, "declined")]
    assert not calls.invited(A, B)
    with pytest.raises(Refused) as refused:
        calls.decline(B, A)
    assert refused.value.code == "no_invitation"


@pytest.mark.parametrize("bad", ["self", "linked"])
def test_refused_requests_change_nothing(bad):
    calls = Calls()
    connect(calls, A, B)
    with pytest.raises(Refused) as refused:
        calls.call(A, A if bad == "self" else B, T0)
    assert refused.value.code == ("call_self" if bad == "self" else "already_in_call")
    assert calls.peers(A) == [B] and calls.next_deadline() is None


def test_two_invitations_at_once_are_independent():
    calls = Calls(timeout_s=30)
    calls.call(A, B, T0)
    calls.call(A, C, T0 + 5)
    assert calls.call(C, A, T0 + 6) == [Linked(A, C)]
    assert calls.expire(T0 + 30) == [Missed(A, B, "busy")]


# --- groups -------------------------------------------------------------------

def test_connecting_with_someone_in_a_call_joins_that_call():
    calls = Calls()
    connect(calls, A, B)
    news = connect(calls, C, A)                 # carol calls alice, alice answers
    assert pairs(news) == {frozenset((A, C)), frozenset((B, C))}
    assert news[0] == Linked(C, A)              # the pair that connected comes first
    assert sorted(calls.group(B), key=repr) == [A, B, C]
    news = connect(calls, D, B)                 # a fourth joins through bob
    assert pairs(news) == {frozenset((D, x)) for x in (A, B, C)}
    assert all(len(calls.peers(x)) == 3 for x in (A, B, C, D))   # everyone with everyone


def test_two_calls_merge_when_their_members_connect():
    calls = Calls()
    connect(calls, A, B)
    connect(calls, C, D)
    news = connect(calls, A, C)
    assert pairs(news) == {frozenset((x, y)) for x in (A, B) for y in (C, D)}
    assert len(calls.group(A)) == 4


def test_a_call_holds_at_most_max_size_people():
    calls = Calls(max_size=3)
    connect(calls, A, B)
    connect(calls, C, A)
    calls.call(D, A, T0)
    assert calls.call(A, D, T0 + 1) == [TooMany(A, D)]
    assert calls.group(A) == [A, B, C] or len(calls.group(A)) == 3
    assert calls.peers(D) == [] and not calls.invited(D, A)


def test_hangup_one_ends_that_link_only():
    calls = Calls()
    connect(calls, A, B)
    connect(calls, C, A)
    assert calls.hangup(A, B) == [Unlinked(A, B, "hangup")]
    assert calls.peers(A) == [C] and calls.peers(B) == [C]
    assert len(calls.group(A)) == 3             # still one call, through carol
    with pytest.raises(Refused) as refused:
        calls.hangup(A, B)
    assert refused.value.code == "not_in_call"
    # Alice and bob can link again: they are in one call, so only they relink.
    calls.call(A, B, T0)
    assert calls.call(B, A, T0) == [Linked(A, B)]


def test_hangup_all_leaves_every_call_and_withdraws_invitations():
    calls = Calls()
    connect(calls, A, B)
    connect(calls, C, A)
    calls.call(A, D, T0)
    news = calls.hangup(A)
    assert set(news) == {Unlinked(A, B, "hangup"), Unlinked(A, C, "hangup"),
                         Missed(A, D, "withdrawn")}
    assert calls.peers(A) == [] and calls.peers(B) == [C]
    assert calls.group(A) == [A]
    with pytest.raises(Refused):
        calls.hangup(A)


def test_leaving_ends_links_and_invitations_both_ways():
    calls = Calls()
    connect(calls, A, B)
    calls.call(A, C, T0)                        # alice was calling carol
    calls.call(D, A, T0)                        # dave was calling alice
    news = calls.leave(A, "lost")
    assert set(news) == {Unlinked(A, B, "lost"), Missed(A, C, "lost"),
                         Refusal(D, A, "lost")}
    assert calls.peers(B) == [] and calls.next_deadline() is None
    assert calls.leave(A, "left") == []         # nothing left to end


def test_a_link_answers_any_invitation_between_the_two():
    calls = Calls()
    connect(calls, A, B)
    calls.call(C, B, T0)                        # carol invites bob ...
    connect(calls, C, A)                        # ... but joins through alice first
    assert calls.linked(C, B) and not calls.invited(C, B)
    assert calls.expire(T0 + 1000) == []        # no stale "busy" later


# --- random sequences ------------------------------------------------------------

PEOPLE = [A, B, C, D, E, F, G]
steps = st.lists(st.tuples(
    st.sampled_from(["call", "decline", "hangup", "hangup_all", "leave", "expire"]),
    st.sampled_from(PEOPLE), st.sampled_from(PEOPLE), st.floats(0, 30)), max_size=60)


@given(steps, st.integers(2, 6))
@settings(max_examples=300, deadline=None)
def test_invariants_hold_whatever_happens(script, max_size):
    calls = Calls(timeout_s=20, max_size=max_size)
    now = T0
    for action, x, y, dt in script:
        now += dt
        try:
            if action == "call":
                news = calls.call(x, y, now)
            elif action == "decline":
                news = calls.decline(x, y)
            elif action == "hangup":
                news = calls.hangup(x, y)
            elif action == "hangup_all":
                news = calls.hangup(x)
            elif action == "leave":
                news = calls.leave(x, "left")
            else:
                news = calls.expire(now)
        except Refused as refused:
            assert refused.code in {"call_self", "already_in_call", "no_invitation",
                                    "not_in_call"}
            continue
        for item in news:
            if isinstance(item, Linked):
                assert calls.linked(item.a, item.b) and item.a is not item.b
        for person in PEOPLE:
            group = calls.group(person)
            assert len(group) <= max_size       # no call ever grows past the limit
            for peer in calls.peers(person):    # links are symmetric, never to self
                assert peer is not person and person in calls.peers(peer)
            assert not (calls.invited(person, person))
        for caller in PEOPLE:                   # linked people aren't inviting each other
            for callee in calls.peers(caller):
                assert not calls.invited(caller, callee)
        if action == "expire":                  # nothing overdue survives an expiry
            deadline = calls.next_deadline()
            assert deadline is None or deadline > now
