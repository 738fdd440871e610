"""NodeBase timers: due ones fire earliest first, ties in the order they were last set."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from meshcast.node import NodeBase


class Clock(NodeBase):
    __slots__ = ("fired",)

    def __init__(self) -> None:
        super().__init__()
        self.fired: list[tuple[Any, float]] = []

    def _on_timer(self, key: Any, now: float) -> None:
        self.fired.append((key, now))
        if key == "chain":
            self._set_timer("after-chain", now)  # due at once: fires in the same call


def test_due_timers_fire_by_deadline_then_in_the_order_they_were_last_set() -> None:
    n = Clock()
    n._set_timer("a", 2.0)
    n._set_timer("b", 1.0)
    n._set_timer("c", 2.0)
    n._set_timer("a", 2.0)  # unchanged: keeps its place
    n._set_timer("d", 2.0)
    n._set_timer("c", 5.0)
    n._set_timer("c", 2.0)  # moved and back: now set after "d"
    n._set_timer("e", 3.0)
    n._cancel_timer("e")
    assert n.next_timer() == 1.0
    n.handle_timer(now=2.5)
    assert [k for k, _ in n.fired] == ["b", "a", "d", "c"]
    assert n.next_timer() is None


def test_a_timer_set_while_firing_and_already_due_fires_in_the_same_call() -> None:
    n = Clock()
    n._set_timer("chain", 1.0)
    n._set_timer("later", 9.0)
    n.handle_timer(now=1.0)
    assert n.fired == [("chain", 1.0), ("after-chain", 1.0)]
    assert n.next_timer() == 9.0


ops = st.lists(st.tuples(st.sampled_from(["set", "cancel", "fire", "ask"]),
                         st.sampled_from(["a", "b", "c", "chain"]),
                         st.integers(0, 6).map(float)), max_size=40)


@given(ops)
def test_next_timer_is_always_the_earliest_deadline_set(steps: list[tuple[str, str, float]]) -> None:
    """`next_timer` keeps the earliest deadline rather than searching on every call; whatever
    the order of sets, re-sets, cancels and firings, it must equal a search of the timers."""
    n = Clock()
    for op, key, t in steps:
        if op == "set":
            n._set_timer(key, t)
        elif op == "cancel":
            n._cancel_timer(key)
        elif op == "fire":
            n.handle_timer(now=t)
        assert n.next_due() == (min(n._timers.values()) if n._timers else math.inf)
        assert n.next_timer() == (min(n._timers.values()) if n._timers else None)
