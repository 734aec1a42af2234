"""Prompt shapes: a `PromptPlan` rendered for this model (its chat template, or a plain
format without one), split into the fixed prefix every job of the plan shares and the
parts after the job's text; with each shape, its label sets' tokens and calibration.

Message contents come from jobs, so they are tokenized without special-token parsing: a
sensor cannot inject `<|im_end|>` or similar. The plan's own lead and tail around the
job's text count as template text (they are ours).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from cachetools import LRUCache

from edge_agent.adapters.engine.port import Context
from edge_agent.core.errors import Code, EngineError
from edge_agent.core.prompt import PromptPlan

_SENTINEL = "\ue000{}\ue001"  # private-use characters: never produced by a chat template


@dataclass
class Shape:
    """A prompt plan rendered for this model: template text and content, alternating."""

    prefix_tokens: list[int]
    suffix_parts: list[tuple[str, bool]]  # (text, is_template) after the job's text
    label_lead: str = ""  # put before each label: " " when the prompt ends mid-line
    keep: bool = True  # its prefix's state may be saved for later jobs (PromptPlan.once)
    label_tokens: LRUCache[tuple[str, ...], tuple[list[list[int]], bool]] = field(
        default_factory=lambda: LRUCache(maxsize=32)
    )
    # Each label set's bias with this prompt: log of the mean label probabilities over
    # content-free texts (contextual calibration), measured once and kept with the shape.
    label_bias: LRUCache[tuple[str, ...], dict[str, float]] = field(
        default_factory=lambda: LRUCache(maxsize=32)
    )


class Shapes:
    """The shapes of the plans seen lately, and the tokens of jobs and labels in them.

    The intake thread tokenizes (the token budget) while the inference thread decodes:
    the tokenizer only reads the vocabulary, but these caches are shared, hence the lock.
    """

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._lock = threading.Lock()
        self._shapes: LRUCache[str, Shape] = LRUCache(maxsize=64)
        self.turn_end = self._find_turn_end()

    def get(self, plan: PromptPlan) -> Shape:
        key = plan.key
        with self._lock:
            shape = self._shapes.get(key)
            if shape is not None:
                return shape
        parts = self.render(plan)
        # parts alternate: template text, content, template text, ... then the answer
        # prefix; the content before the last template part is the job's text placeholder,
        # and everything before it is the fixed prefix.
        job_index = len(parts) - 3
        prefix: list[int] = [] if self._ctx.bos is None else [self._ctx.bos]
        for text, is_template in parts[:job_index]:
            prefix.extend(self._ctx.tokenize(text, special=is_template))
        suffix = parts[job_index + 1 :]
        tail_text = "".join(text for text, _ in suffix)
        # A label follows the answer prefix as a word would: after a space unless the prompt
        # ends a line (chat templates end with "assistant\n").
        lead = " " if tail_text and not tail_text[-1].isspace() else ""
        shape = Shape(
            prefix_tokens=prefix, suffix_parts=suffix, label_lead=lead, keep=not plan.once
        )
        with self._lock:
            self._shapes[key] = shape
        return shape

    def clear(self) -> None:
        with self._lock:
            self._shapes.clear()

    def render(self, plan: PromptPlan) -> list[tuple[str, bool]]:
        """Messages + a job placeholder rendered, split into (text, is_template) parts."""
        fixed = plan.fixed
        contents = [m.content for m in fixed] + [""]
        messages = [(m.role, _SENTINEL.format(i)) for i, m in enumerate(fixed)]
        messages.append(("user", plan.lead + _SENTINEL.format(len(fixed)) + plan.tail))
        rendered = self._ctx.chat(messages)
        if rendered is None:
            rendered = plain_format(messages)
        parts: list[tuple[str, bool]] = []
        rest = rendered
        for i in range(len(fixed) + 1):
            marker = _SENTINEL.format(i)
            before, found, rest = rest.partition(marker)
            if not found:  # pragma: no cover - every template keeps message contents
                raise EngineError(Code.INTERNAL_ERROR, "chat template dropped a message")
            parts.append((before, True))
            parts.append((contents[i], False))
        parts.append((rest, True))
        parts.append((plan.answer_prefix, False))
        return parts

    def prompt_text(self, plan: PromptPlan, text: str) -> str:
        """The whole prompt as text (template, fixed part, the job's text)."""
        parts = self.render(plan)
        job_index = len(parts) - 3
        head = "".join(t for t, _ in parts[:job_index])
        tail = "".join(t for t, _ in parts[job_index + 1 :])
        return head + text + tail

    def job_tokens(self, shape: Shape, text: str) -> list[int]:
        """The job's own tokens after the prefix: its text, then the shape's tail."""
        tokens: list[int] = self._ctx.tokenize(text, special=False)
        for part, is_template in shape.suffix_parts:
            tokens.extend(self._ctx.tokenize(part, special=is_template))
        return tokens

    def label_tokens(self, shape: Shape, labels: tuple[str, ...]) -> tuple[list[list[int]], bool]:
        """Each label's tokens, and whether the end-of-turn token is scored after each:
        when one label's tokens start another's, so "high" and "high_temp" compare fairly."""
        with self._lock:
            cached = shape.label_tokens.get(labels)
        if cached is not None:
            return cached
        tokens = [self._ctx.tokenize(shape.label_lead + label, special=False) for label in labels]
        as_tuples = [tuple(t) for t in tokens]
        with_end = any(
            a != b and len(a) < len(b) and b[: len(a)] == a for a in as_tuples for b in as_tuples
        )
        result = (tokens, with_end)
        with self._lock:
            shape.label_tokens[labels] = result
        return result

    def known_bias(self, shape: Shape, labels: tuple[str, ...]) -> dict[str, float] | None:
        with self._lock:
            return shape.label_bias.get(labels)

    def keep_bias(self, shape: Shape, labels: tuple[str, ...], bias: dict[str, float]) -> None:
        with self._lock:
            shape.label_bias[labels] = bias

    def _find_turn_end(self) -> int:
        """The token that closes an assistant turn (scored after each label)."""
        text = self._ctx.chat([("user", "u"), ("assistant", "\ue002")])
        if text and "\ue002" in text:
            after = text.split("\ue002", 1)[1]
            tokens = self._ctx.tokenize(after, special=True) if after else []
            if tokens:
                return tokens[0]
        return self._ctx.eos


def plain_format(messages: Sequence[tuple[str, str]]) -> str:
    """For models without a chat template (base models): instructions, then turns as lines.

    The answer prefix of the plan (e.g. "Label:") follows the last line, so few-shot
    examples and the job read the same: "Message: ...\nLabel: red\n\n".
    """
    out: list[str] = []
    for role, content in messages:
        if role == "system":
            out.append(f"{content}\n\n")
        elif role == "user":
            out.append(f"{content}\n")
        else:
            out.append(f"{content}\n\n")
    return "".join(out)
