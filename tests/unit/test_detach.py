"""A relay's record of spent tokens (`Detach`): kept compact, and exact where it matters."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from meshcast import messages as m
from meshcast.crypto import SimCrypto
from meshcast.node import DETACH_GRACE_S
from peer.node import PeerNode

moves = st.lists(st.tuples(st.integers(0, 5), st.integers(-1, 15), st.floats(0.0, 5.0),
                           st.floats(0.0, 20.0)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(moves, st.floats(0.0, 20.0))
def test_a_token_is_spent_exactly_when_a_move_after_its_issue_said_so(moves, margin):
    """Against a dict of the latest `until` and grace end per (node, sub-stream): for every
    token still valid when shown, both say the same, though the record reuses expired places."""
    node = PeerNode(channel="c", crypto=SimCrypto(), rng=random.Random(0), tracker="t")
    latest: dict[tuple[int, int], tuple[float, float]] = {}
    now = 0.0
    for who, k, step, life in moves:
        now += step
        node._detach(m.Detach(who, k, now + life), now)
        until, _ = latest.get((who, k), (-1.0, 0.0))
        latest[(who, k)] = (max(until, now + life), now + DETACH_GRACE_S)
        for (w, kk), (until, grace_end) in latest.items():
            moved = node._moved(w, kk)
            recorded = moved[0] if moved is not None else -1.0
            # The expiries a token shown now may have (it is not expired): any from now on.
            for expires in {now, now + margin, until, recorded}:
                for at in {now, grace_end}:
                    if expires >= at:
                        assert node._spent(w, kk, expires, at) == (
                            until > expires and at >= grace_end), (w, kk, expires, at)
    assert len(node.detached or ()) <= 3 * 6 * 17
