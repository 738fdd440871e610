"""Messages and effects write their own `__init__` (a compiled build runs a dataclass-generated
one interpreted, ~6× slower): each must be written out, take exactly its dataclass fields, in
order, with their defaults, and set every one of them, or a field added later would be silently
left out."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from meshcast import effects, messages

RECORDS = [cls for mod in (messages, effects) for cls in vars(mod).values()
           if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == mod.__name__]


def test_every_message_and_effect_is_covered():
    names = {cls.__name__ for cls in RECORDS}
    assert {"Token", "Assign", "ChunkHead", "Subscribe", "SendChunk", "Deliver", "Send"} <= names
    assert len(RECORDS) >= 30


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__name__)
def test_init_takes_the_fields_in_order_with_their_defaults(cls):
    fields = dataclasses.fields(cls)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert [p.name for p in params] == [f.name for f in fields]
    for p, f in zip(params, fields):
        assert p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        want = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
        assert p.default == want, f"{cls.__name__}.{f.name}"


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__name__)
def test_init_sets_every_field(cls):
    fields = dataclasses.fields(cls)
    values = [object() for _ in fields]  # distinct, so a swapped or dropped field shows
    record = cls(*values)
    assert [getattr(record, f.name) for f in fields] == values
    assert record == cls(**{f.name: v for f, v in zip(fields, values)})


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__name__)
def test_init_is_written_out_not_generated_by_dataclasses(cls):
    # A dataclass-generated one is compiled from a string ("<string>"); a compiled build's
    # own has no code object at all.
    code = getattr(cls.__init__, "__code__", None)
    assert code is None or code.co_filename == inspect.getfile(cls), code
