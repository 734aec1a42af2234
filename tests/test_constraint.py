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

from edge_agent.core.constraint import WORK_PER_TOKEN, JsonConstraint, State, _Grounds
from edge_agent.core.errors import Code, EngineError, JobError
from edge_agent.core.schema import SchemaLimits, compile_schema

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
    if isinstance(schema["type"], list) and "null" in schema["type"] and rng.random() < 0.3:
        return None  # a nullable value may be null
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
    from edge_agent.core.schema import problems

    rng = random.Random(seed)
    node = compile_schema(schema, LIMITS)
    good = canonical_instance(schema, rng)
    assert problems(good, node) == []
    jsonschema.validate(good, schema)
    bad = dict(good)
    if bad:
        key = next(iter(bad))
        bad[key] = {"nested": [object.__name__]}  # the wrong type for any declared leaf
        assert (problems(bad, node) == []) == jsonschema.Draft202012Validator(schema).is_valid(bad)
    missing = {k: v for i, (k, v) in enumerate(good.items()) if i > 0}
    assert (problems(missing, node) == []) == jsonschema.Draft202012Validator(schema).is_valid(
        missing
    )


# ---- grounding: values copied from the job's text -------------------------------------

texts = st.one_of(
    st.text(max_size=60),
    st.lists(
        st.sampled_from(
            ["Sensor", "TS-7", "(hall)", "48.5", "%,", '"hi"', "user=alice", "ok.", "-3", "℃",
             "1,200", "port", "22", "a\\b", "\t", "é"]
        ),
        max_size=10,
    ).map(" ".join),
)  # fmt: skip


def grounded_values(schema: dict[str, Any], data: Any) -> list[tuple[str, Any]]:
    """(type, value) of every string and number of `data` the schema grounds (not an enum
    or const, not x-grounded false)."""
    if "enum" in schema or "const" in schema or data is None:
        return []
    kind = schema["type"][0] if isinstance(schema["type"], list) else schema["type"]
    if kind == "object":
        return [v for k, sub in schema["properties"].items() for v in grounded_values(sub, data[k])]
    if kind == "array":
        return [v for item in data for v in grounded_values(schema["items"], item)]
    if kind in ("string", "number", "integer") and schema.get("x-grounded", True):
        return [(kind, data)]
    return []


@settings(max_examples=150, deadline=None)
@given(root_schemas, texts, st.integers(0, 2**32), st.sampled_from([0.05, 0.3, 0.8]))
def test_a_bound_constraint_copies_every_value_from_the_text(
    schema: dict[str, Any], text: str, seed: int, bias: float
) -> None:
    constraint = JsonConstraint(compile_schema(schema, LIMITS)).bind(text)
    data = json.loads(walk(constraint, random.Random(seed), bias).decode("utf-8"))
    jsonschema.validate(data, schema)
    grounds = _Grounds.of(text)  # the numbers the agent reads in the text (tested below)
    for kind, value in grounded_values(schema, data):
        if kind == "string":
            if schema_min_length(schema) <= 1 and text.strip():  # else any string
                assert value == "" or value in text, (value, text)
            continue
        offered = grounds.integers if kind == "integer" else grounds.numbers
        if offered:  # else any number: the text has none of that kind
            assert json.dumps(value).encode() in offered, (value, offered, text)


def schema_min_length(schema: dict[str, Any]) -> int:
    found = [0]

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            found.append(int(node.get("minLength", 0)))
            for value in node.values():
                visit(value)

    visit(schema)
    return max(found)


def test_a_span_is_whole_words_and_x_grounded_false_frees_a_value() -> None:
    schema = {
        "type": "object",
        "properties": {
            "device": {"type": "string"},
            "note": {"type": "string", "x-grounded": False},
            "value": {"type": "number"},
        },
    }
    c = JsonConstraint(compile_schema(schema, LIMITS)).bind("Sensor TS-7 reports 48.5 %")
    assert c.feed(c.initial(), b'{"device": "TS-7", "note": "made up", "value": 48.5}')
    for wrong in (
        b'{"device": "TS-8"',  # not in the text
        b'{"device": "S-7"',  # not a whole word
        b'{"device": "TS-7", "note": "x", "value": 48.6',  # a number the text does not hold
    ):
        state = c.feed(c.initial(), wrong)
        assert state is None, wrong
    partial = c.feed(c.initial(), b'{"device": "Sens')
    assert partial is not None
    assert c.step(partial, ord('"')) is None  # "Sens" is not a word of the text


def test_grounding_must_be_a_boolean() -> None:
    with pytest.raises(JobError) as caught:
        compile_schema(
            {"type": "object", "properties": {"a": {"type": "string", "x-grounded": "no"}}},
            LIMITS,
        )
    assert caught.value.code == Code.INVALID_SCHEMA


def test_the_numbers_read_in_a_text() -> None:
    g = _Grounds.of("TS-7 at -19.5 C, 1,200 units, id ab12, v2.0.1, 007 and 0.50 V")
    # whole numbers only (not the 12 of ab12 nor the pieces of a version), as JSON writes
    # them (007 is 7, 1,200 is 1200)
    assert g.numbers == (b"7", b"-19.5", b"1200", b"0.50")
    assert g.integers == (b"7", b"1200")


def test_a_nullable_value_is_null_or_the_value_and_nothing_else() -> None:
    schema = {
        "type": "object",
        "properties": {
            "user": {"type": ["string", "null"]},
            "port": {"type": ["integer", "null"]},
            "tags": {"type": ["array", "null"], "items": {"type": "string"}},
        },
    }
    for text in (
        b'{"user": null, "port": null, "tags": null}',
        b'{"user": "alice", "port": 22, "tags": ["a"]}',
        b'{"user": null, "port": 22, "tags": []}',
    ):
        state = feed(schema, text)
        assert state is not None and JsonConstraint(compile_schema(schema, LIMITS)).is_complete(
            state
        ), text
    for text in (
        b'{"user": nul,',
        b'{"user": nulll',
        b'{"user": "a", "port": n2',
        b'{"user": none',
    ):
        assert feed(schema, text) is None, text
    # a value that is not nullable cannot be null
    assert feed({"type": "object", "properties": {"a": {"type": "string"}}}, b'{"a": n') is None
    # the finishing path answers null: the shortest value
    c = JsonConstraint(compile_schema(schema, LIMITS))
    state, out = c.initial(), bytearray()
    while not c.is_complete(state):
        byte = c.finish_byte(state)
        assert byte is not None
        out.append(byte)
        state = c.step(state, byte)
        assert state is not None
    assert json.loads(out) == {"user": None, "port": None, "tags": None}


def test_grounded_nullable_values_are_a_span_or_null() -> None:
    schema = {"type": "object", "properties": {"user": {"type": ["string", "null"]}}}
    bound = JsonConstraint(compile_schema(schema, LIMITS)).bind("Accepted publickey for deploy")
    assert bound.feed(bound.initial(), b'{"user": "deploy"}') is not None
    assert bound.feed(bound.initial(), b'{"user": null}') is not None
    assert bound.feed(bound.initial(), b'{"user": "root"') is None


@pytest.mark.parametrize(
    "text", ["TS-70 TS-7", "TS-7 TS-70", "TS-70 and TS-7 here", "port 2222 and port 22"]
)
def test_a_word_is_a_value_wherever_it_appears_whole(text: str) -> None:
    """A span may end where any of its copies in the text ends a word: "TS-7" is a whole
    word in "TS-70 TS-7" even though its first match is the start of "TS-70"."""
    schema = {"type": "object", "properties": {"v": {"type": "string"}}}
    bound = JsonConstraint(compile_schema(schema, LIMITS)).bind(text)
    value = "TS-7" if "TS" in text else "22"
    state = bound.feed(bound.initial(), f'{{"v": "{value}"}}'.encode())
    assert state is not None and bound.is_complete(state), text
    # and never part of a word: "TS-" or "222" end no word anywhere
    part = "TS-" if "TS" in text else "222"
    assert bound.feed(bound.initial(), f'{{"v": "{part}"}}'.encode()) is None


@pytest.mark.parametrize("text", ["0\r", "Door D-1 open \n", "a\t\t"])
def test_a_span_never_runs_into_trailing_whitespace(text: str) -> None:
    """Found by the property test: a span could grow into the spaces that end a text,
    from where no word end is reachable: a dead end for the decoder."""
    schema = {"type": "object", "properties": {"v": {"type": "string"}}}
    bound = JsonConstraint(compile_schema(schema, LIMITS)).bind(text)
    last_word = text.rsplit(maxsplit=1)[-1]
    state = bound.feed(bound.initial(), f'{{"v": "{last_word}'.encode())
    assert state is not None
    escaped_space = json.dumps(text[len(text.rstrip())])[1:-1].encode()
    assert bound.feed(state, escaped_space) is None  # not into the trailing whitespace
    assert bound.feed(state, b'"}') is not None


def test_grounding_work_grows_with_the_copies_of_a_word_and_is_bounded() -> None:
    """A text that repeats one short word offers every copy as a span's start: each byte
    of a value looks at all of them. Natural text costs far less (docs/delivery.md)."""
    schema = {"type": "object", "properties": {"f": {"type": "string"}}, "required": ["f"]}
    node = compile_schema(schema, SchemaLimits(max_string_chars=2000))

    def work_for(text: str, value: bytes) -> int:
        bound = JsonConstraint(node).bind(text)
        state = bound.feed(bound.initial(), b'{"f": "' + value)
        assert state is not None
        return bound.work

    repeated = work_for(" ".join(["ab"] * 600), b"ab ab ab ab")
    natural = work_for("Sensor TS-7 reports humidity 48.5 % in the server room.", b"humidity")
    assert repeated > 600 * 10 and natural < 50
    bound = JsonConstraint(node).bind(" ".join(["ab"] * 600))
    state = bound.feed(bound.initial(), b'{"f": "')
    assert state is not None
    bound.limit_work(written=7)  # the next token may cost WORK_PER_TOKEN at most

    def search() -> None:  # over many tokens, each a few bytes
        for _ in range(100):
            bound.feed(state, b"ab ab")

    with pytest.raises(EngineError) as info:
        search()
    assert info.value.code == Code.COST_EXCEEDED
    assert bound.work <= WORK_PER_TOKEN + 600  # stopped within one step of the cap
