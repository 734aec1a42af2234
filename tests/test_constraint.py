"""The JSON constraint automaton: it accepts every valid document of the schema in the
canonical form, and every document it lets through parses and validates."""

from __future__ import annotations

import json
import random
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.constraint import JsonConstraint, State
from edge_agent.schema import SchemaLimits, compile_schema

LIMITS = SchemaLimits(max_string_chars=12, max_items=4)

leaf_schemas = st.one_of(
    st.builds(lambda: {"type": "string"}),
    st.builds(
        lambda lo, extra: {"type": "string", "minLength": lo, "maxLength": lo + extra},
        st.integers(0, 3),
        st.integers(0, 5),
    ),
    st.just({"type": "number"}),
    st.just({"type": "integer"}),
    st.just({"type": "boolean"}),
    st.just({"type": ["string", "null"]}),
    st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=4, unique=True).map(
        lambda v: {"enum": v}
    ),
    st.lists(
        st.one_of(st.integers(-50, 50), st.booleans(), st.text(max_size=3)),
        min_size=1,
        max_size=3,
        unique=True,
    ).map(lambda v: {"enum": v}),
)
keys = st.text(alphabet='abcdefghijk_é"\\', min_size=1, max_size=6)


def _objects(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(keys, children, max_size=4).map(
        lambda props: {"type": "object", "properties": props, "required": list(props)}
    )


def _arrays(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(
        lambda items, lo, extra: {
            "type": "array",
            "items": items,
            "minItems": lo,
            "maxItems": lo + extra,
        },
        children,
        st.integers(0, 2),
        st.integers(0, 2),
    )


schemas = st.recursive(leaf_schemas, lambda c: _objects(c) | _arrays(c), max_leaves=8)
root_schemas = _objects(schemas)


def walk(constraint: JsonConstraint, rng: random.Random, finish_bias: float) -> bytes:
    """Follow random allowed bytes (and sometimes the finishing byte) to a complete document."""
    state: State = constraint.initial()
    out = bytearray()
    for _ in range(5000):
        if constraint.is_complete(state):
            assert all(constraint.step(state, b) is None for b in range(256))
            return bytes(out)
        if rng.random() < finish_bias:
            byte = constraint.finish_byte(state)
            assert byte is not None
        else:
            allowed = [b for b in range(256) if constraint.step(state, b) is not None]
            assert allowed, f"dead end after {bytes(out)!r}"
            byte = rng.choice(allowed)
        new_state = constraint.step(state, byte)
        assert new_state is not None
        state = new_state
        out.append(byte)
    raise AssertionError("walk did not finish")


@settings(max_examples=150, deadline=None)
@given(root_schemas, st.integers(0, 2**32), st.sampled_from([0.05, 0.3, 0.8]))
def test_every_walk_parses_and_validates(schema: dict[str, Any], seed: int, bias: float) -> None:
    constraint = JsonConstraint(compile_schema(schema, LIMITS))
    text = walk(constraint, random.Random(seed), bias)
    data = json.loads(text.decode("utf-8"))
    jsonschema.validate(data, schema)
    # and it round-trips: what the agent publishes is valid JSON again
    json.dumps(data, allow_nan=False)


def canonical_instance(schema: dict[str, Any], rng: random.Random) -> Any:
    if "enum" in schema:
        return rng.choice(schema["enum"])
    kind = schema["type"][0] if isinstance(schema["type"], list) else schema["type"]
    if kind == "object":
        return {k: canonical_instance(v, rng) for k, v in schema["properties"].items()}
    if kind == "array":
        n = rng.randint(schema.get("minItems", 0), schema.get("maxItems", LIMITS.max_items))
        return [canonical_instance(schema["items"], rng) for _ in range(n)]
    if kind == "string":
        lo = schema.get("minLength", 0)
        hi = min(schema.get("maxLength", LIMITS.max_string_chars), LIMITS.max_string_chars)
        alphabet = 'ab "\\\n\té€😀/'
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))
    if kind == "integer":
        return rng.randint(-(10**6), 10**6)
    if kind == "number":
        return round(rng.uniform(-1000, 1000), rng.randint(0, 4))
    return rng.random() < 0.5


@settings(max_examples=150, deadline=None)
@given(root_schemas, st.integers(0, 2**32))
def test_canonical_documents_are_accepted(schema: dict[str, Any], seed: int) -> None:
    constraint = JsonConstraint(compile_schema(schema, LIMITS))
    instance = canonical_instance(schema, random.Random(seed))
    text = json.dumps(instance, ensure_ascii=False).encode()
    state = constraint.feed(constraint.initial(), text)
    assert state is not None, text
    assert constraint.is_complete(state)


def feed(schema: dict[str, Any], text: bytes) -> State | None:
    c = JsonConstraint(compile_schema(schema, LIMITS))
    return c.feed(c.initial(), text)


SENSOR = {
    "type": "object",
    "properties": {
        "device": {"type": "string"},
        "value": {"type": "number"},
        "ok": {"type": "boolean"},
    },
}


def test_keys_and_punctuation_are_forced() -> None:
    c = JsonConstraint(compile_schema(SENSOR, LIMITS))
    forced, state = c.forced(c.initial())
    assert forced == b'{"device": "'
    state2 = c.feed(state, b"TS-1")
    assert state2 is not None
    forced, state3 = c.forced(state2)
    assert forced == b""  # the string may go on
    state4 = c.step(state3, ord('"'))
    assert state4 is not None
    forced, _ = c.forced(state4)
    assert forced == b', "value": '


def test_literal_completes_once_unambiguous() -> None:
    c = JsonConstraint(
        compile_schema({"type": "object", "properties": {"ok": {"type": "boolean"}}}, LIMITS)
    )
    _, state = c.forced(c.initial())
    state = c.step(state, ord("t"))
    assert state is not None
    forced, state = c.forced(state)
    assert forced == b"rue}"
    assert c.is_complete(state)


@pytest.mark.parametrize(
    "text",
    [
        b'{"device": "a\x01"',  # raw control character
        b'{"device": "\\x"',  # bad escape
        b'{"device": "\\ud800"',  # lone surrogate
        b'{"device": "\xc3\x28"',  # invalid UTF-8
        b'{"device": "\xed\xa0\x80"',  # UTF-8 encoded surrogate
        b'{"device": "a", "value": 1e5',  # exponents are not produced
        b'{"device": "a", "value": 01',  # leading zero
        b'{"device": "a", "value": -,',  # a sign needs a digit
        b'{"device": "a", "value": 1.}',  # no fraction digits
        b'{"device" : ',  # whitespace is canonical
        b'{"value": 1',  # properties in declaration order
    ],
)
def test_invalid_bytes_are_refused(text: bytes) -> None:
    state = feed(SENSOR, text[:-1])
    if state is not None:
        assert feed(SENSOR, text) is None


def test_integer_refuses_a_fraction() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    assert feed(schema, b'{"n": 12}') is not None
    assert feed(schema, b'{"n": 12.') is None


def test_string_length_cap_forces_the_closing_quote() -> None:
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 3}}}
    c = JsonConstraint(compile_schema(schema, LIMITS))
    state = c.feed(c.initial(), b'{"s": "abc')
    assert state is not None
    assert c.step(state, ord("d")) is None
    forced, end = c.forced(state)
    assert forced == b'"}'
    assert c.is_complete(end)


def test_min_length_blocks_an_early_close() -> None:
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 2}}}
    assert feed(schema, b'{"s": "a"') is None
    assert feed(schema, b'{"s": "ab"}') is not None


def test_array_bounds() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2}
        },
    }
    assert feed(schema, b'{"a": []') is None
    assert feed(schema, b'{"a": [1, 2]}') is not None
    assert feed(schema, b'{"a": [1, 2,') is None


def test_escapes_and_unicode_count_as_one_character() -> None:
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 2}}}
    assert feed(schema, '{"s": "\\né"}'.encode()) is not None
    assert feed(schema, '{"s": "\\u00e9😀"}'.encode()) is not None
    assert feed(schema, '{"s": "ééé'.encode()) is None


def test_finish_closes_from_anywhere() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {
                "type": "array",
                "items": {"type": "object", "properties": {"x": {"type": "number"}}},
                "minItems": 2,
            },
            "e": {"enum": ["alpha", "alphabet", 3]},
        },
    }
    c = JsonConstraint(compile_schema(schema, LIMITS))
    for prefix in (b"", b'{"a": [', b'{"a": [{"x": -', b'{"a": [{"x": 1.'):
        state = c.feed(c.initial(), prefix)
        assert state is not None
        out = bytearray(prefix)
        while not c.is_complete(state):
            byte = c.finish_byte(state)
            assert byte is not None
            state = c.step(state, byte)
            assert state is not None
            out.append(byte)
        jsonschema.validate(json.loads(out), schema)


@settings(max_examples=150, deadline=None)
@given(root_schemas, st.integers(0, 2**32))
def test_own_validator_agrees_with_jsonschema(schema: dict[str, Any], seed: int) -> None:
    from edge_agent.schema import problems

    rng = random.Random(seed)
    good = canonical_instance(schema, rng)
    assert problems(good, schema) == []
    jsonschema.validate(good, schema)
    bad = dict(good)
    if bad:
        key = next(iter(bad))
        bad[key] = {"nested": [object.__name__]}  # the wrong type for any declared leaf
        assert (problems(bad, schema) == []) == jsonschema.Draft202012Validator(schema).is_valid(
            bad
        )
    missing = {k: v for i, (k, v) in enumerate(good.items()) if i > 0}
    assert (problems(missing, schema) == []) == jsonschema.Draft202012Validator(schema).is_valid(
        missing
    )
