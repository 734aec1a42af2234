"""Prompts for classify and extract jobs, fixed part first.

A prompt is a `PromptPlan`: chat messages that do not depend on the job's text (the
instructions, the labels or the schema, any few-shot examples), then the job's text as the
last user message. Putting the fixed part first lets the engine keep its evaluated state
and charge each job only for its own text (docs/performance.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edge_agent.core.schema import (
    ArrayNode,
    LiteralNode,
    Node,
    NullableNode,
    NumberNode,
    ObjectNode,
    StringNode,
)

DEFAULT_CLASSIFY_INSTRUCTIONS = (
    "You classify short messages from sensors, machines and system logs. "
    "Read the message and choose the one label that fits it best."
)
DEFAULT_EXTRACT_INSTRUCTIONS = (
    "You extract structured data from short messages sent by sensors, machines and system "
    "logs. Copy values exactly as they appear in the message."
)


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class Example:
    text: str
    answer: str  # a label, or the JSON text of the expected data


@dataclass(frozen=True)
class PromptPlan:
    """The job-independent messages; the job's text becomes one more user message.

    The last user message is `lead + text + tail`; the answer starts with `answer_prefix`
    (inside the assistant's turn), and labels or JSON follow it.
    """

    fixed: tuple[Message, ...]
    lead: str = ""
    tail: str = ""
    answer_prefix: str = ""
    # A plan made for one job (an extract profile's nearest rows as its examples): the
    # engine keeps no saved state of its prefix, which no other job would restore.
    once: bool = False

    @property
    def key(self) -> str:
        """Identifies the fixed part, for the engine's prefix cache."""
        blob = json.dumps(
            [[m.role, m.content] for m in self.fixed] + [self.lead, self.tail, self.answer_prefix]
        ).encode()
        return hashlib.blake2b(blob, digest_size=16).hexdigest()


def classify_plan(
    labels: Sequence[str],
    instructions: str | None,
    examples: Sequence[Example],
    descriptions: Sequence[tuple[str, str]] = (),
) -> PromptPlan:
    described = dict(descriptions)
    listed = "\n".join(
        f"- {label}: {described[label]}" if label in described else f"- {label}" for label in labels
    )
    system = (
        f"{(instructions or DEFAULT_CLASSIFY_INSTRUCTIONS).strip()}\n\n"
        f"Labels:\n{listed}\n\nAnswer with the label only."
    )
    # "Message: " and "Label:" frame the job for small models: with them SmolLM2-135M picks
    # the right label about 1.5x as often on tests/data/eval (docs/performance.md).
    return PromptPlan(
        fixed=(Message("system", system), *_shots(examples, "Message: ", "Label: ")),
        lead="Message: ",
        answer_prefix="Label:",
    )


def extract_plan(
    schema: ObjectNode, instructions: str | None, examples: Sequence[Example]
) -> PromptPlan:
    """The fields come from the compiled schema, the same node the constraint and the
    validation read (names, types, enum values, `description`s)."""
    fields = "\n".join(_describe_properties(schema, indent=""))
    system = (
        f"{(instructions or DEFAULT_EXTRACT_INSTRUCTIONS).strip()}\n\n"
        f"Answer with one JSON object with these fields:\n{fields}"
    )
    return PromptPlan(
        fixed=(Message("system", system), *_shots(examples, "Message: ", "")),
        lead="Message: ",
    )


def _shots(examples: Sequence[Example], lead: str, answer_prefix: str) -> list[Message]:
    """Few-shot turns framed exactly like the job's own turn."""
    turns: list[Message] = []
    for example in examples:
        turns.append(Message("user", lead + example.text))
        turns.append(Message("assistant", answer_prefix + example.answer))
    return turns


def _describe_properties(node: ObjectNode, indent: str) -> list[str]:
    lines: list[str] = []
    notes = node.descriptions or (None,) * len(node.properties)
    for (name, sub), note in zip(node.properties, notes, strict=True):
        lines.append(f"{indent}- {name} ({_type_name(sub)}){f': {note}' if note else ''}")
        inner = _unwrap(sub)
        if isinstance(inner, ArrayNode):
            inner = _unwrap(inner.items)
        if isinstance(inner, ObjectNode):
            lines.extend(_describe_properties(inner, indent + "  "))
    return lines


def _unwrap(node: Node) -> Node:
    return node.inner if isinstance(node, NullableNode) else node


def _type_name(node: Node) -> str:
    node = _unwrap(node)  # null is not announced: the model writes it only when nothing fits
    if isinstance(node, LiteralNode):
        if set(node.texts) == {"true", "false"}:
            return "boolean"
        if len(node.texts) == 1:
            return f"always {node.texts[0]}"
        return "one of " + ", ".join(node.texts)
    if isinstance(node, StringNode):
        return "string"
    if isinstance(node, NumberNode):
        return "integer" if node.integer else "number"
    if isinstance(node, ArrayNode):
        return f"list of {_type_name(node.items)}"
    return "object"


def canonical_json(data: Any) -> str:
    """JSON in the form the agent's constrained decoder writes (`, ` and `: ` separators)."""
    return json.dumps(data, ensure_ascii=False)
