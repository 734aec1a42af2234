"""The JSON Schema subset extraction jobs may use, compiled into a small node tree.

Supported (docs/protocol.md, "Extraction schemas"):
    type: object | string | number | integer | boolean | array (or a list of types, of which
          the first non-"null" one is used: the output then matches that member of the union;
          with "null" in the list the value may also be null)
    object: properties, required, additionalProperties (false or true: only declared
            properties are ever produced)
    string: enum, const, minLength, maxLength
    array:  items, minItems, maxItems
    enum / const of strings, numbers or booleans on any value
    annotations, ignored: title, description, $schema, $id, $comment, default, examples, format

Every declared property is produced, in declaration order, so the output always validates
whether or not a property is listed in `required`. Anything else (pattern, minimum, $ref,
oneOf, ...) is rejected with `unsupported_schema` rather than silently not enforced: the
agent promises that `data` validates against the job's schema.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from edge_agent.core.errors import Code, JobError

ANNOTATIONS = frozenset(
    {"title", "description", "$schema", "$id", "$comment", "default", "examples", "format"}
)
# `x-grounded: false` lets a string or number be anything (a summary, a computed value);
# by default it is copied from the job's text (docs/protocol.md, "Extraction schemas").
GROUNDED = "x-grounded"
_KEYWORDS: dict[str, frozenset[str]] = {
    "object": frozenset({"type", "properties", "required", "additionalProperties"}),
    "string": frozenset({"type", "minLength", "maxLength", GROUNDED}),
    "number": frozenset({"type", GROUNDED}),
    "integer": frozenset({"type", GROUNDED}),
    "boolean": frozenset({"type"}),
    "array": frozenset({"type", "items", "minItems", "maxItems"}),
}


# Numbers in enum / const: as long as the decoder's own (15 integer and 10 fraction digits,
# a sign and a point), so a schema cannot force thousands of digits into the answer.
MAX_NUMBER_CHARS = 32


@dataclass(frozen=True)
class SchemaLimits:
    """Bounds that keep a job's schema cheap to compile and its output bounded."""

    max_depth: int = 6
    max_properties: int = 64
    max_enum: int = 64
    max_key_chars: int = 64
    max_string_chars: int = 256
    max_items: int = 16


@dataclass(frozen=True)
class StringNode:
    min_length: int
    max_length: int
    grounded: bool = True  # a span of the job's text


@dataclass(frozen=True)
class NumberNode:
    integer: bool
    grounded: bool = True  # a number written in the job's text


@dataclass(frozen=True)
class LiteralNode:
    """A choice among fixed JSON texts: enum, const, boolean."""

    texts: tuple[str, ...]


@dataclass(frozen=True)
class ArrayNode:
    items: Node
    min_items: int
    max_items: int


@dataclass(frozen=True)
class ObjectNode:
    properties: tuple[tuple[str, Node], ...]
    required: frozenset[str] = frozenset()
    additional: bool = True  # additionalProperties
    # each property's `description`, in order, for the prompt (not part of the shape: two
    # schemas that differ only there share one automaton)
    descriptions: tuple[str | None, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class NullableNode:
    """A value or `null` (`"type": [..., "null"]`): the model may answer null when the
    text holds nothing for it."""

    inner: Node


Node = StringNode | NumberNode | LiteralNode | ArrayNode | ObjectNode | NullableNode


def compile_schema(schema: Any, limits: SchemaLimits) -> ObjectNode:
    """Check `schema` against the supported subset and compile it; the root must be an object."""
    counter = [0]
    node = _compile(schema, limits, depth=1, path="schema", counter=counter)
    if isinstance(node, NullableNode):
        node = node.inner  # an answer is always an object
    if not isinstance(node, ObjectNode):
        raise JobError(Code.INVALID_SCHEMA, 'schema: the root must be {"type": "object"}')
    return node


def _fail(code: Code, path: str, why: str) -> JobError:
    return JobError(code, f"{path}: {why}")


def _compile(schema: Any, limits: SchemaLimits, depth: int, path: str, counter: list[int]) -> Node:
    if not isinstance(schema, dict):
        raise _fail(Code.INVALID_SCHEMA, path, "must be a JSON object")
    if depth > limits.max_depth:
        raise _fail(Code.INVALID_SCHEMA, path, f"nested deeper than {limits.max_depth} levels")
    known = set().union(*_KEYWORDS.values()) | ANNOTATIONS | {"enum", "const"}
    alien = set(schema) - known
    if alien:
        listed = ", ".join(sorted(alien))
        raise _fail(Code.UNSUPPORTED_SCHEMA, path, f"unsupported keyword(s): {listed}")
    if "enum" in schema or "const" in schema:
        return _compile_literal(schema, limits, path)
    kind = _type_of(schema, path)
    unknown = set(schema) - _KEYWORDS[kind] - ANNOTATIONS
    if unknown:
        listed = ", ".join(sorted(unknown))
        raise _fail(Code.UNSUPPORTED_SCHEMA, path, f"unsupported keyword(s) for {kind}: {listed}")
    node = _compile_typed(schema, kind, limits, depth, path, counter)
    declared = schema.get("type")
    return NullableNode(node) if isinstance(declared, list) and "null" in declared else node


def _compile_typed(
    schema: dict[str, Any], kind: str, limits: SchemaLimits, depth: int, path: str,
    counter: list[int],
) -> Node:  # fmt: skip
    if kind == "object":
        return _compile_object(schema, limits, depth, path, counter)
    if kind == "array":
        if "items" not in schema:
            raise _fail(Code.INVALID_SCHEMA, path, "an array needs `items`")
        lo = _count(schema, "minItems", 0, limits.max_items, path)
        hi = _count(schema, "maxItems", limits.max_items, limits.max_items, path)
        if lo > hi:
            raise _fail(Code.INVALID_SCHEMA, path, "minItems is greater than maxItems")
        items = _compile(schema["items"], limits, depth + 1, f"{path}.items", counter)
        return ArrayNode(items=items, min_items=lo, max_items=hi)
    if kind == "string":
        lo = _count(schema, "minLength", 0, limits.max_string_chars, path)
        hi = _count(schema, "maxLength", limits.max_string_chars, limits.max_string_chars, path)
        if lo > hi:
            raise _fail(Code.INVALID_SCHEMA, path, "minLength is greater than maxLength")
        return StringNode(min_length=lo, max_length=hi, grounded=_grounded(schema, path))
    if kind == "boolean":
        return LiteralNode(texts=("true", "false"))
    return NumberNode(integer=kind == "integer", grounded=_grounded(schema, path))


def _grounded(schema: dict[str, Any], path: str) -> bool:
    value = schema.get(GROUNDED, True)
    if not isinstance(value, bool):
        raise _fail(Code.INVALID_SCHEMA, f"{path}.{GROUNDED}", "must be true or false")
    return value


def _type_of(schema: dict[str, Any], path: str) -> str:
    declared = schema.get("type")
    if declared is None:
        raise _fail(Code.INVALID_SCHEMA, path, "needs a `type` (or `enum`/`const`)")
    candidates = declared if isinstance(declared, list) else [declared]
    for candidate in candidates:
        if not isinstance(candidate, str):
            raise _fail(Code.INVALID_SCHEMA, path, "`type` must be a string or a list of strings")
    usable = [c for c in candidates if c != "null"]
    if not usable:
        raise _fail(Code.UNSUPPORTED_SCHEMA, path, "a value that can only be null is not supported")
    kind = usable[0]
    if kind not in _KEYWORDS:
        raise _fail(Code.INVALID_SCHEMA, path, f"unknown type {kind!r}")
    return str(kind)


def _count(schema: dict[str, Any], key: str, default: int, cap: int, path: str) -> int:
    value = schema.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(Code.INVALID_SCHEMA, f"{path}.{key}", "must be a non-negative integer")
    if value > cap and key.startswith("min"):
        raise _fail(Code.UNSUPPORTED_SCHEMA, f"{path}.{key}", f"must be at most {cap} here")
    return min(value, cap)


def _compile_literal(schema: dict[str, Any], limits: SchemaLimits, path: str) -> LiteralNode:
    unknown = set(schema) - {"enum", "const", "type"} - ANNOTATIONS
    if unknown:
        listed = ", ".join(sorted(unknown))
        raise _fail(Code.UNSUPPORTED_SCHEMA, path, f"unsupported keyword(s) beside enum: {listed}")
    if "const" in schema:
        values = [schema["const"]]
    else:
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            raise _fail(Code.INVALID_SCHEMA, f"{path}.enum", "must be a non-empty list")
        if len(values) > limits.max_enum:
            raise _fail(Code.INVALID_SCHEMA, f"{path}.enum", f"more than {limits.max_enum} values")
    kinds: list[Any] | None = None
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    texts: list[str] = []
    for value in values:
        if isinstance(value, float) and not math.isfinite(value):
            raise _fail(Code.INVALID_SCHEMA, f"{path}.enum", "values must be finite")
        if not isinstance(value, str | int | float | bool):
            raise _fail(
                Code.UNSUPPORTED_SCHEMA, f"{path}.enum", "only strings, numbers and booleans"
            )
        if isinstance(value, str) and len(value) > limits.max_string_chars:
            raise _fail(Code.INVALID_SCHEMA, f"{path}.enum", "a value is too long")
        if kinds is not None and not _admits(kinds, value):
            # Only values the declared type admits, so `{"type": "string", "enum": [...]}`
            # cannot produce a number.
            continue
        written = value
        if isinstance(value, float) and value.is_integer() and "number" not in (kinds or []):
            # 1.0 is an integer in JSON Schema; written as 1 it is one for every validator
            # (and for ours, which then checks the type the schema declares).
            written = int(value)
        text = json.dumps(written, ensure_ascii=False)
        if not isinstance(written, str) and len(text) > MAX_NUMBER_CHARS:
            raise _fail(
                Code.INVALID_SCHEMA,
                f"{path}.enum",
                f"numbers are limited to {MAX_NUMBER_CHARS} characters",
            )
        if text not in texts:
            texts.append(text)
    if not texts:
        # An enum left empty by its type can never validate.
        raise _fail(Code.INVALID_SCHEMA, path, "no enum value matches the declared type")
    return LiteralNode(texts=tuple(texts))


def _admits(kinds: list[Any], value: Any) -> bool:
    kind = _json_type(value)
    if kind in kinds:
        return True
    if kind == "integer" and "number" in kinds:
        return True
    return kind == "number" and value.is_integer() and "integer" in kinds


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str):
        return "string"
    if isinstance(value, int):
        return "integer"
    return "number"


def _compile_object(
    schema: dict[str, Any], limits: SchemaLimits, depth: int, path: str, counter: list[int]
) -> ObjectNode:
    props = schema.get("properties", {})
    if not isinstance(props, dict):
        raise _fail(Code.INVALID_SCHEMA, f"{path}.properties", "must be an object")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise _fail(Code.INVALID_SCHEMA, f"{path}.required", "must be a list of property names")
    missing = [r for r in required if r not in props]
    if missing:
        raise _fail(
            Code.INVALID_SCHEMA, f"{path}.required", f"names undeclared properties: {missing}"
        )
    extra = schema.get("additionalProperties", True)
    if not isinstance(extra, bool):
        raise _fail(Code.UNSUPPORTED_SCHEMA, f"{path}.additionalProperties", "only true or false")
    compiled: list[tuple[str, Node]] = []
    descriptions: list[str | None] = []
    for key, sub in props.items():
        counter[0] += 1
        if counter[0] > limits.max_properties:
            raise _fail(
                Code.INVALID_SCHEMA, path, f"more than {limits.max_properties} properties in all"
            )
        if not key or len(key) > limits.max_key_chars:
            raise _fail(
                Code.INVALID_SCHEMA,
                f"{path}.properties",
                f"keys must be 1-{limits.max_key_chars} characters",
            )
        compiled.append(
            (key, _compile(sub, limits, depth + 1, f"{path}.properties.{key}", counter))
        )
        note = sub.get("description")
        descriptions.append(note.strip() if isinstance(note, str) and note.strip() else None)
    return ObjectNode(
        properties=tuple(compiled),
        required=frozenset(required),
        additional=extra,
        descriptions=tuple(descriptions),
    )


def schema_for_fields(fields: dict[str, str]) -> dict[str, Any]:
    """The JSON Schema of tests/data/eval extract rows: every field required, nothing else."""
    return {
        "type": "object",
        "properties": {name: {"type": kind} for name, kind in fields.items()},
        "required": list(fields),
        "additionalProperties": False,
    }


def problems(instance: Any, node: Node, path: str = "data") -> list[str]:
    """Where `instance` breaks the compiled schema; empty when it validates.

    The agent's own check of every extraction before it is sent, and `edge-agent eval`'s
    schema-validity figure; tests cross-check it against the jsonschema library. It reads
    the same node the prompt and the constraint are built from.
    """
    if isinstance(node, NullableNode):
        return [] if instance is None else problems(instance, node.inner, path)
    if isinstance(node, LiteralNode):
        if any(_same(instance, json.loads(text)) for text in node.texts):
            return []
        return [f"{path}: not one of the allowed values"]
    if isinstance(node, StringNode):
        if not isinstance(instance, str):
            return [f"{path}: expected a string"]
        if not node.min_length <= len(instance) <= node.max_length:
            return [f"{path}: length {len(instance)} is out of bounds"]
        return []
    if isinstance(node, NumberNode):
        kind = "integer" if node.integer else "number"
        if isinstance(instance, bool) or not _admits([kind], instance):
            return [f"{path}: expected {'an integer' if node.integer else 'a number'}"]
        return []
    if isinstance(node, ArrayNode):
        if not isinstance(instance, list):
            return [f"{path}: expected an array"]
        found: list[str] = []
        if not node.min_items <= len(instance) <= node.max_items:
            found.append(f"{path}: {len(instance)} items is out of bounds")
        for i, item in enumerate(instance):
            found.extend(problems(item, node.items, f"{path}[{i}]"))
        return found
    if not isinstance(instance, dict):
        return [f"{path}: expected an object"]
    found = [f"{path}.{name}: required" for name in sorted(node.required - set(instance))]
    props = dict(node.properties)
    for name, value in instance.items():
        if name in props:
            found.extend(problems(value, props[name], f"{path}.{name}"))
        elif not node.additional:
            found.append(f"{path}.{name}: not allowed")
    return found


def _same(a: Any, b: Any) -> bool:
    return (type(a) is type(b) and a == b) or (
        isinstance(a, int | float)
        and isinstance(b, int | float)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
        and a == b
    )
