"""NodeBase timers: due ones fire earliest first, ties in the order they were last set. And its
effect queue, taken by `drain` or `swap_effects`."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshcast.effects import Notice
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


class FastClock(Clock):
    """Timers "a" and "b" in the fast fields, the others in the dict."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__()
        self._fast_keys = ("a", "b")


@pytest.mark.parametrize("fast", [False, True], ids=["dict", "fast"])
def test_due_timers_fire_by_deadline_then_in_the_order_they_were_last_set(fast: bool) -> None:
    n = FastClock() if fast else Clock()  # ("a" and "b" in the fast fields)
    n._set_timer("a", 2.0)
    n._set_timer("b", 1.0)
    n._set_timer("c", 2.0)
    n._set_timer("f", 2.0)
    n._set_timer("a", 2.0)  # unchanged: keeps its place (before "f")
    n._set_timer("d", 2.0)
    n._set_timer("c", 5.0)
    n._set_timer("c", 2.0)  # moved and back: now set after "d"
    n._set_timer("e", 3.0)
    n._cancel_timer("e")
    assert n.next_timer() == 1.0
    n.handle_timer(now=2.5)
    assert [k for k, _ in n.fired] == ["b", "a", "f", "d", "c"]
    assert n.next_timer() is None


def test_a_timer_set_while_firing_and_already_due_fires_in_the_same_call() -> None:
    n = Clock()
    n._set_timer("chain", 1.0)
    n._set_timer("later", 9.0)
    n.handle_timer(now=1.0)
    assert n.fired == [("chain", 1.0), ("after-chain", 1.0)]
    assert n.next_timer() == 9.0


ops = st.lists(st.tuples(st.sampled_from(["set", "cancel", "fire", "ask"]),
                         st.sampled_from(["a", "b", "c", "d", "chain"]),
                         st.integers(0, 6).map(float)), max_size=40)


@given(st.booleans(), ops)
def test_timers_behave_as_one_heap_of_deadline_then_set_order(
        fast: bool, steps: list[tuple[str, str, float]]) -> None:
    """Whatever the order of sets, re-sets, cancels and firings, and whether a timer lives in
    the fast fields or the dict: `next_due` is the earliest deadline set, and due timers fire
    by deadline, then in the order they were last set (a re-set to the same deadline keeps its
    place), as a model of key → (deadline, set order) says."""
    n = FastClock() if fast else Clock()
    model: dict[str, tuple[float, int]] = {}
    order = 0

    def model_set(key: str, t: float) -> None:
        nonlocal order
        if key not in model or model[key][0] != t:
            order += 1
            model[key] = (t, order)

    for op, key, t in steps:
        if op == "set":
            n._set_timer(key, t)
            model_set(key, t)
        elif op == "cancel":
            n._cancel_timer(key)
            model.pop(key, None)
        elif op == "fire":
            want = []
            while model and min(model.values())[0] <= t:
                k = min(model, key=lambda k: model[k])
                want.append((k, t))
                del model[k]
                if k == "chain":
                    model_set("after-chain", t)
            n.fired.clear()
            n.handle_timer(now=t)
            assert n.fired == want
        earliest = min((w for w, _ in model.values()), default=math.inf)
        assert n.next_due() == earliest
        assert n.next_timer() == (None if earliest == math.inf else earliest)
        for k in ("a", "b", "c", "d", "chain", "after-chain"):
            assert n.timer_at(k) == (model[k][0] if k in model else None)


def test_swap_effects_hands_over_the_queue_and_queues_next_in_the_list_given() -> None:
    n = Clock()
    n._out.append(Notice("one"))
    spare: list[Any] = []
    taken = n.swap_effects(spare)
    assert [e.text for e in taken] == ["one"]
    n._out.append(Notice("two"))
    assert n._out is spare and [e.text for e in spare] == ["two"]
    assert [e.text for e in n.drain()] == ["two"] and n.drain() == []
