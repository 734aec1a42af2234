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
    schema: dict[str, Any], instructions: str | None, examples: Sequence[Example]
) -> PromptPlan:
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


def _describe_properties(schema: dict[str, Any], indent: str) -> list[str]:
    lines: list[str] = []
    for name, sub in schema.get("properties", {}).items():
        lines.append(f"{indent}- {name} ({_type_name(sub)}){_note(sub)}")
        if isinstance(sub, dict) and _first_type(sub) == "object":
            lines.extend(_describe_properties(sub, indent + "  "))
        items = sub.get("items") if isinstance(sub, dict) else None
        if isinstance(items, dict) and _first_type(items) == "object":
            lines.extend(_describe_properties(items, indent + "  "))
    return lines


def _first_type(schema: dict[str, Any]) -> str | None:
    declared = schema.get("type")
    if isinstance(declared, list):
        return next((t for t in declared if t != "null"), None)
    return declared if isinstance(declared, str) else None


def _type_name(schema: Any) -> str:
    if not isinstance(schema, dict):
        return "value"
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(v) for v in schema["enum"])
    if "const" in schema:
        return "always " + json.dumps(schema["const"])
    kind = _first_type(schema) or "value"
    if kind == "array" and isinstance(schema.get("items"), dict):
        return f"list of {_type_name(schema['items'])}"
    return kind


def _note(schema: Any) -> str:
    if isinstance(schema, dict) and isinstance(schema.get("description"), str):
        return f": {schema['description'].strip()}"
    return ""


def canonical_json(data: Any) -> str:
    """JSON in the form the agent's constrained decoder writes (`, ` and `: ` separators)."""
    return json.dumps(data, ensure_ascii=False)
