"""A byte-level automaton that admits exactly the JSON texts a compiled schema allows.

The engine asks it three things per step: does this token's bytes fit (`step` over each
byte), which bytes are forced from here (`forced`: keys, punctuation, the rest of an enum
value; they are evaluated as one batch instead of sampled), and how to finish quickly when
the token budget runs out (`finish_byte`). States are immutable tuples, so trying a
candidate token never disturbs the current state.

The output form is canonical: `{"key": value, "key2": value}` with one space after `:` and
`,`, every declared property in declaration order. Numbers are plain decimals without an
exponent (at most 15 integer and 10 fraction digits), so every number the model writes
parses back to a finite float or an int of the same value. Strings are valid UTF-8 with no
raw control characters and no surrogate escapes, so the result always round-trips through
`json.loads`/`json.dumps`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from edge_agent.core.errors import Code, EngineError
from edge_agent.core.schema import (
    LiteralNode,
    Node,
    NullableNode,
    NumberNode,
    ObjectNode,
    StringNode,
)

MAX_INT_DIGITS = 15
MAX_FRAC_DIGITS = 10

_QUOTE, _BACKSLASH, _SPACE = 0x22, 0x5C, 0x20
_COMMA, _CLOSE_BRACKET, _MINUS, _DOT, _ZERO = 0x2C, 0x5D, 0x2D, 0x2E, 0x30
_ESCAPABLE = frozenset(b'"\\/bfnrt')
_NULL = b"null"
_HEX = frozenset(b"0123456789abcdefABCDEF")


@dataclass(frozen=True)
class Fixed:
    text: bytes


@dataclass(frozen=True)
class Str:
    min_length: int
    max_length: int
    grounded: bool = False  # to be bound to a span of the job's text (JsonConstraint.bind)
    field: str = ""  # the property path it is the value of ("user", "reading.value")


@dataclass(frozen=True)
class Num:
    integer: bool
    grounded: bool = False  # to be bound to the numbers written in the job's text
    field: str = ""


@dataclass(frozen=True, eq=False)
class Span:
    """A string's content that must be a piece of the job's text, whole words: `text` is
    that text as a JSON string's content (escaped), `starts` the offsets where a word may
    begin (after a space or an opening bracket, quote, `=` or `:`), `ends` where one may end
    (before a space, a closing bracket or quote, or punctuation), `bounds` where every
    character (or escape sequence) begins, for counting characters."""

    text: bytes
    bounds: frozenset[int]
    starts: tuple[int, ...]
    ends: frozenset[int]
    min_length: int
    max_length: int
    field: str = ""
    # the last word end in the text: a span never grows past it (from beyond it, trailing
    # spaces, no end could be reached: a dead end)
    last_end: int = 0


@dataclass(frozen=True)
class Lit:
    texts: tuple[bytes, ...]
    field: str = ""


@dataclass(frozen=True)
class Arr:
    items: tuple[Segment, ...]
    min_items: int
    max_items: int
    field: str = ""


@dataclass(frozen=True)
class Opt:
    """A value or `null`: the first byte chooses (no value of the branch starts with n)."""

    branch: tuple[Segment, ...]
    field: str = ""


Segment = Fixed | Str | Num | Lit | Arr | Span | Opt
# A frame is (segments, index of the current segment, that segment's sub-state).
Frame = tuple[tuple[Segment, ...], int, Any]
State = tuple[Frame, ...]


def compile_segments(node: Node, path: str = "") -> tuple[Segment, ...]:
    """Flatten a schema node into fixed text and value segments; each value segment knows
    the property path it belongs to (for per-field confidence)."""
    out: list[Segment] = []
    _emit(node, out, path)
    merged: list[Segment] = []
    for seg in out:
        if isinstance(seg, Fixed) and merged and isinstance(merged[-1], Fixed):
            merged[-1] = Fixed(merged[-1].text + seg.text)
        else:
            merged.append(seg)
    return tuple(merged)


def _emit(node: Node, out: list[Segment], path: str) -> None:
    if isinstance(node, ObjectNode):
        out.append(Fixed(b"{"))
        for i, (key, sub) in enumerate(node.properties):
            sep = b", " if i else b""
            out.append(Fixed(sep + json.dumps(key, ensure_ascii=False).encode() + b": "))
            _emit(sub, out, f"{path}.{key}" if path else key)
        out.append(Fixed(b"}"))
    elif isinstance(node, StringNode):
        value = Str(node.min_length, node.max_length, node.grounded, path)
        out.extend((Fixed(b'"'), value, Fixed(b'"')))
    elif isinstance(node, NumberNode):
        out.append(Num(node.integer, node.grounded, path))
    elif isinstance(node, LiteralNode):
        out.append(Lit(tuple(t.encode() for t in node.texts), path))
    elif isinstance(node, NullableNode):
        out.append(Opt(compile_segments(node.inner, path), path))
    else:
        out.append(Fixed(b"["))
        out.append(Arr(compile_segments(node.items, path), node.min_items, node.max_items, path))


def _initial_sub(seg: Segment) -> Any:
    if isinstance(seg, Fixed):
        return 0
    if isinstance(seg, Span):
        return (0, 0, None)  # (bytes matched, characters, candidate starts; None: all)
    if isinstance(seg, Str):
        return (0, 0, 0)  # (characters so far, mode, aux)
    if isinstance(seg, Num):
        return ("start", 0, 0)  # (state, integer digits, fraction digits)
    if isinstance(seg, Lit):
        return (tuple(range(len(seg.texts))), 0)  # (alternatives still alive, bytes matched)
    return ("first", 0)  # arrays: (phase, items so far); Opt: (phase, bytes of null)


# The grounding work a job may do (`JsonConstraint.limit_work`): places of its text looked
# at, in all and for each byte of answer written, and for one token chosen. Measured on
# real rows (the eval sets, 2,000 characters of log lines with 25 string fields, a
# CSV-like text that repeats its field names 100 times): at most 700 a token and 31,000 in
# all, about 1 microsecond each. A text that repeats one short word 600 times took 2
# million for one token (2 s of the one inference thread, every other job waiting).
WORK_BASE = 50_000
WORK_PER_BYTE = 300
WORK_PER_TOKEN = 20_000


class JsonConstraint:
    """The automaton for one schema; cheap to keep per schema shape."""

    def __init__(self, node: ObjectNode | None, segments: tuple[Segment, ...] = ()) -> None:
        self.segments = compile_segments(node) if node is not None else segments
        self._shortest: int | None = None
        # Places of the job's text looked at while matching grounded spans: the automaton's
        # only work that grows with the text (a text that repeats one word offers every
        # copy as a start). Only a bound automaton (`bind`, one per job) counts any; past
        # `work_limit`, a step raises `cost_exceeded` (`limit_work`).
        self.work = 0
        self.work_limit: int | None = None

    def limit_work(self, written: int) -> None:
        """Before choosing the next token, with `written` bytes of answer so far: matching
        spans may cost WORK_BASE plus WORK_PER_BYTE a byte written in all, and at most
        WORK_PER_TOKEN more for this token; a step past that raises EngineError
        `cost_exceeded`, at once, not after the token's whole search."""
        self.work_limit = min(WORK_BASE + WORK_PER_BYTE * written, self.work + WORK_PER_TOKEN)

    @property
    def grounded(self) -> bool:
        """Some value must come from the job's text: `bind` before decoding."""
        return _has_grounded(self.segments)

    def bind(self, text: str) -> JsonConstraint:
        """The automaton for one job: each grounded string a span of `text`, each grounded
        number one of the numbers written in it (or any number when it has none)."""
        if not self.grounded:
            return self
        return JsonConstraint(None, _bind(self.segments, _Grounds.of(text)))

    def shortest_length(self) -> int:
        """Bytes of the shortest document the schema allows (the least an answer needs)."""
        if self._shortest is None:
            state = self.initial()
            count = 0
            while not self.is_complete(state) and count < 1 << 20:
                byte = self.finish_byte(state)
                next_state = None if byte is None else self.step(state, byte)
                if next_state is None:  # pragma: no cover - finish_byte always fits
                    break
                state = next_state
                count += 1
            self._shortest = count
        return self._shortest

    def field_at(self, state: State) -> str | None:
        """The property path whose value the next byte belongs to (None: punctuation or a
        key the schema forces)."""
        while state:
            segs, idx, sub = state[-1]
            seg = segs[idx]
            if not isinstance(seg, Fixed):
                return seg.field
            if sub < len(seg.text):
                return None
            state = _advance(state)  # a fixed stretch just written: the next value's
        return None

    def initial(self) -> State:
        return ((self.segments, 0, _initial_sub(self.segments[0])),)

    def step(self, state: State, byte: int) -> State | None:
        """The state after `byte`, or None when the schema does not allow it here."""
        while state:
            segs, idx, sub = state[-1]
            seg = segs[idx]
            if isinstance(seg, Arr):
                fed = self._feed_array(state, seg, sub, byte)
                if fed is not None:
                    return fed
            elif isinstance(seg, Opt):
                fed = self._feed_opt(state, seg, sub, byte)
                if fed is not None:
                    return fed
            else:
                if isinstance(seg, Span):
                    self.work += len(seg.starts if sub[2] is None else sub[2])
                    if self.work_limit is not None and self.work > self.work_limit:
                        raise EngineError(
                            Code.COST_EXCEEDED,
                            f"matching the answer to the text cost {self.work} steps (a "
                            "text that repeats one word many times?); a job may spend "
                            f"{WORK_BASE} plus {WORK_PER_BYTE} a byte written, "
                            f"{WORK_PER_TOKEN} a token",
                        )
                new_sub = _feed(seg, sub, byte)
                if new_sub is not None:
                    return (*state[:-1], (segs, idx, new_sub))
            if not _can_end(seg, sub):
                return None
            state = _advance(state)
        return None

    def feed(self, state: State, data: bytes) -> State | None:
        for byte in data:
            next_state = self.step(state, byte)
            if next_state is None:
                return None
            state = next_state
        return state

    def is_complete(self, state: State) -> bool:
        while state:
            segs, idx, sub = state[-1]
            if not _can_end(segs[idx], sub):
                return False
            state = _advance(state)
        return True

    def forced(self, state: State, limit: int = 512) -> tuple[bytes, State]:
        """The bytes the schema forces from `state` on, and the state after them."""
        out = bytearray()
        while len(out) < limit:
            byte = self.only_next(state)
            if byte is None:
                break
            next_state = self.step(state, byte)
            if next_state is None:  # pragma: no cover - only_next promised this byte fits
                break
            out.append(byte)
            state = next_state
        return bytes(out), state

    def only_next(self, state: State) -> int | None:
        """The one byte allowed next, or None when there is a choice (or nothing is left)."""
        while state:
            segs, idx, sub = state[-1]
            seg = segs[idx]
            if isinstance(seg, Fixed):
                if sub < len(seg.text):
                    return seg.text[sub]
            elif isinstance(seg, Lit):
                alive, pos = sub
                longer = [seg.texts[i][pos] for i in alive if len(seg.texts[i]) > pos]
                ended = any(len(seg.texts[i]) == pos for i in alive)
                if longer and not ended and len(set(longer)) == 1:
                    return int(longer[0])
                if longer:
                    return None
            elif isinstance(seg, Span):
                if _must_end(seg, sub):
                    pass
                elif _can_end(seg, sub):
                    return None
                else:
                    following = _span_next_bytes(seg, sub)
                    return following[0] if len(following) == 1 else None
            elif isinstance(seg, Str | Num):
                if not _must_end(seg, sub):
                    return None
            elif isinstance(seg, Opt):
                phase, pos = sub
                if phase == "first":
                    return None  # null or a value
                if phase == "null" and pos < len(_NULL):
                    return int(_NULL[pos])
            else:
                phase, count = sub
                if phase == "sep":
                    return _SPACE
                if phase == "after":
                    if count >= seg.max_items:
                        return _CLOSE_BRACKET
                    return _COMMA if count < seg.min_items else None
                if phase == "first" and seg.max_items == 0:
                    return _CLOSE_BRACKET
                if phase == "item" or (phase == "first" and seg.min_items > 0):
                    return self.only_next(_push_item(state, seg))
                if phase == "first":
                    return None
            state = _advance(state)
        return None

    def finish_byte(self, state: State) -> int | None:
        """A byte that moves toward the shortest complete document (None when complete)."""
        byte = self.only_next(state)
        if byte is not None:
            return byte
        while state:
            segs, idx, sub = state[-1]
            seg = segs[idx]
            if isinstance(seg, Fixed) and sub < len(seg.text):
                return seg.text[sub]
            if isinstance(seg, Str):
                length, mode, aux = sub
                if mode == 1:
                    return ord("n")
                if mode == 2:
                    return _ZERO
                if mode == 3:
                    return int(aux[1])  # the lowest continuation byte allowed
                if length < seg.min_length:
                    return ord("x")
            elif isinstance(seg, Num):
                if sub[0] in ("start", "minus", "dot"):
                    return _ZERO
            elif isinstance(seg, Span):
                if not _can_end(seg, sub):
                    following = _span_next_bytes(seg, sub)
                    return following[0] if following else None
            elif isinstance(seg, Lit):
                alive, pos = sub
                shortest = min((seg.texts[i] for i in alive), key=len)
                if len(shortest) > pos:
                    return int(shortest[pos])
            elif isinstance(seg, Opt):
                if sub[0] == "first":
                    return _NULL[0]  # null is the shortest answer
            elif isinstance(seg, Arr):
                phase, count = sub
                if phase in ("first", "after"):
                    if count >= seg.min_items:
                        return _CLOSE_BRACKET
                    if phase == "after":
                        return _COMMA
                if phase in ("first", "item"):
                    return self.finish_byte(_push_item(state, seg))
            if not _can_end(seg, sub):  # pragma: no cover - every case above returns
                return None
            state = _advance(state)
        return None

    def _feed_array(self, state: State, seg: Arr, sub: Any, byte: int) -> State | None:
        phase, count = sub
        segs, idx, _ = state[-1]
        if phase in ("first", "after") and byte == _CLOSE_BRACKET and count >= seg.min_items:
            return (*state[:-1], (segs, idx, ("closed", count)))
        if phase == "after" and byte == _COMMA and count < seg.max_items:
            return (*state[:-1], (segs, idx, ("sep", count)))
        if phase == "sep" and byte == _SPACE:
            return (*state[:-1], (segs, idx, ("item", count)))
        if phase == "item" or (phase == "first" and seg.max_items > 0):
            return self.step(_push_item(state, seg), byte)
        return None

    def _feed_opt(self, state: State, seg: Opt, sub: Any, byte: int) -> State | None:
        phase, pos = sub
        segs, idx, _ = state[-1]
        if phase == "first" and byte == _NULL[0]:
            return (*state[:-1], (segs, idx, ("null", 1)))
        if phase == "first":
            pushed = (
                *state[:-1],
                (segs, idx, ("in", 0)),
                (seg.branch, 0, _initial_sub(seg.branch[0])),
            )
            return self.step(pushed, byte)
        if phase == "null" and pos < len(_NULL) and _NULL[pos] == byte:
            return (*state[:-1], (segs, idx, ("null", pos + 1)))
        return None


def _push_item(state: State, seg: Arr) -> State:
    segs, idx, (_, count) = state[-1]
    return (*state[:-1], (segs, idx, ("in", count)), (seg.items, 0, _initial_sub(seg.items[0])))


def _advance(state: State) -> State:
    """Move past the current segment (which can end), popping finished frames."""
    segs, idx, _ = state[-1]
    if idx + 1 < len(segs):
        return (*state[:-1], (segs, idx + 1, _initial_sub(segs[idx + 1])))
    state = state[:-1]
    if not state:
        return state
    psegs, pidx, (_, count) = state[-1]
    if isinstance(psegs[pidx], Opt):  # the value of a nullable: it is complete
        return (*state[:-1], (psegs, pidx, ("closed", 0)))
    # The finished frame was an array item: the array now expects `,` or `]`.
    return (*state[:-1], (psegs, pidx, ("after", count + 1)))


def _can_end(seg: Segment, sub: Any) -> bool:
    if isinstance(seg, Fixed):
        return bool(sub == len(seg.text))
    if isinstance(seg, Span):
        matched, chars, starts = sub
        if matched == 0:
            return seg.max_length == 0  # a value is never empty unless it must be
        if chars < seg.min_length:
            return False
        # At the end of a word in any of the places the span may be copied from ("TS-7" is
        # a word in "TS-70 TS-7" though not at its first match); or, at maxLength, at the
        # end of any character (a dead end otherwise: it could neither go on nor stop).
        # Character bounds are the same at every candidate: they all matched the same bytes.
        if any(i + matched in seg.ends for i in starts):
            return True
        return chars >= seg.max_length and next(iter(starts)) + matched in seg.bounds
    if isinstance(seg, Str):
        length, mode, _ = sub
        return bool(mode == 0 and length >= seg.min_length)
    if isinstance(seg, Num):
        return bool(sub[0] in ("zero", "int", "frac"))
    if isinstance(seg, Lit):
        alive, pos = sub
        return any(len(seg.texts[i]) == pos for i in alive)
    if isinstance(seg, Opt):
        return bool(sub[0] == "closed" or sub == ("null", len(_NULL)))
    return bool(sub[0] == "closed")


def _must_end(seg: Str | Num | Span, sub: Any) -> bool:
    if isinstance(seg, Span):
        if not _can_end(seg, sub):
            return False
        return sub[1] >= seg.max_length or not _span_next_bytes(seg, sub)
    if isinstance(seg, Str):
        length, mode, _ = sub
        return bool(mode == 0 and length >= seg.max_length)
    state, int_digits, frac_digits = sub
    if seg.integer:
        return bool(state == "zero" or (state == "int" and int_digits >= MAX_INT_DIGITS))
    return bool(state == "frac" and frac_digits >= MAX_FRAC_DIGITS)


def _feed(seg: Segment, sub: Any, byte: int) -> Any:
    if isinstance(seg, Fixed):
        return sub + 1 if sub < len(seg.text) and seg.text[sub] == byte else None
    if isinstance(seg, Span):
        return _feed_span(seg, sub, byte)
    if isinstance(seg, Str):
        return _feed_string(seg, sub, byte)
    if isinstance(seg, Num):
        return _feed_number(seg, sub, byte)
    if isinstance(seg, Lit):
        alive, pos = sub
        still = tuple(i for i in alive if len(seg.texts[i]) > pos and seg.texts[i][pos] == byte)
        return (still, pos + 1) if still else None
    return None  # pragma: no cover - arrays are fed by JsonConstraint._feed_array


def _feed_string(seg: Str, sub: Any, byte: int) -> Any:
    length, mode, aux = sub
    if mode == 0:
        if byte == _QUOTE or byte < 0x20 or byte == 0x7F or length >= seg.max_length:
            return None
        if byte == _BACKSLASH:
            return (length, 1, 0)
        if byte < 0x80:
            return (length + 1, 0, 0)
        return _utf8_lead(length, byte)
    if mode == 1:  # after a backslash
        if byte in _ESCAPABLE:
            return (length + 1, 0, 0)
        return (length, 2, (0, False)) if byte == ord("u") else None
    if mode == 2:  # inside \u: `aux` is (hex digits so far, first digit was D)
        count, first_d = aux
        if byte not in _HEX:
            return None
        if count == 1 and first_d and byte not in b"01234567":
            return None  # D800-DFFF would be a lone surrogate, which UTF-8 cannot carry
        if count == 3:
            return (length + 1, 0, 0)
        return (length, 2, (count + 1, first_d or (count == 0 and byte in b"dD")))
    remaining, lo, hi = aux  # mode 3: inside a multi-byte UTF-8 character
    if not lo <= byte <= hi:
        return None
    if remaining == 1:
        return (length + 1, 0, 0)
    return (length, 3, (remaining - 1, 0x80, 0xBF))


def _utf8_lead(length: int, byte: int) -> Any:
    # RFC 3629 well-formed sequences, so decoding never needs a replacement character.
    if 0xC2 <= byte <= 0xDF:
        return (length, 3, (1, 0x80, 0xBF))
    if byte == 0xE0:
        return (length, 3, (2, 0xA0, 0xBF))
    if byte == 0xED:
        return (length, 3, (2, 0x80, 0x9F))
    if 0xE1 <= byte <= 0xEF:
        return (length, 3, (2, 0x80, 0xBF))
    if byte == 0xF0:
        return (length, 3, (3, 0x90, 0xBF))
    if 0xF1 <= byte <= 0xF3:
        return (length, 3, (3, 0x80, 0xBF))
    if byte == 0xF4:
        return (length, 3, (3, 0x80, 0x8F))
    return None


def _feed_number(seg: Num, sub: Any, byte: int) -> Any:
    state, int_digits, frac_digits = sub
    digit = 0x30 <= byte <= 0x39
    if state == "start" and byte == _MINUS:
        return ("minus", 0, 0)
    if state in ("start", "minus") and digit:
        return ("zero", 1, 0) if byte == _ZERO else ("int", 1, 0)
    if state == "int" and digit and int_digits < MAX_INT_DIGITS:
        return ("int", int_digits + 1, 0)
    if state in ("zero", "int") and byte == _DOT and not seg.integer:
        return ("dot", int_digits, 0)
    if state in ("dot", "frac") and digit and frac_digits < MAX_FRAC_DIGITS:
        return ("frac", int_digits, frac_digits + 1)
    return None


# ---- grounding: values copied from the job's text ------------------------------------

_NUMBER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?![\w.])|(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])")


_OPENING = frozenset("([{<\"'=:")
_CLOSING = frozenset(")]}>\"',;:.!?")


@dataclass(frozen=True)
class _Grounds:
    """What one job's text offers: its JSON-escaped bytes with character and word bounds,
    and the numbers written in it (JSON texts; integers separately)."""

    text: bytes
    bounds: frozenset[int]
    starts: tuple[int, ...]
    ends: frozenset[int]
    numbers: tuple[bytes, ...]
    integers: tuple[bytes, ...]

    @classmethod
    def of(cls, text: str) -> _Grounds:
        escaped = bytearray()
        bounds: list[int] = []
        starts: list[int] = []
        ends: list[int] = []
        for i, char in enumerate(text):
            offset = len(escaped)
            before = text[i - 1] if i else " "
            if not char.isspace() and (before.isspace() or before in _OPENING):
                starts.append(offset)
            if i and not before.isspace() and (char.isspace() or char in _CLOSING):
                ends.append(offset)
            bounds.append(offset)
            if char in '"\\' or char < " ":
                escaped += json.dumps(char)[1:-1].encode()
            else:
                escaped += char.encode("utf-8", "surrogatepass")
        if text and not text[-1].isspace():
            ends.append(len(escaped))
        bounds.append(len(escaped))
        numbers: list[bytes] = []
        integers: list[bytes] = []
        for match in _NUMBER.finditer(text):
            written = match.group(0).replace(",", "")
            negative = written.startswith("-")
            digits = written.lstrip("-")
            whole, _, fraction = digits.partition(".")
            if len(whole) > MAX_INT_DIGITS or len(fraction) > MAX_FRAC_DIGITS:
                continue
            canonical = (
                ("-" if negative else "") + str(int(whole)) + (f".{fraction}" if fraction else "")
            )
            value = canonical.encode()
            if value not in numbers:
                numbers.append(value)
            if not fraction and value not in integers:
                integers.append(value)
        return cls(
            bytes(escaped),
            frozenset(bounds),
            tuple(starts),
            frozenset(ends),
            tuple(numbers),
            tuple(integers),
        )


def _has_grounded(segments: tuple[Segment, ...]) -> bool:
    for seg in segments:
        if isinstance(seg, Str | Num) and seg.grounded:
            return True
        if isinstance(seg, Arr) and _has_grounded(seg.items):
            return True
        if isinstance(seg, Opt) and _has_grounded(seg.branch):
            return True
    return False


def _bind(segments: tuple[Segment, ...], grounds: _Grounds) -> tuple[Segment, ...]:
    out: list[Segment] = []
    for seg in segments:
        if isinstance(seg, Str) and seg.grounded and seg.min_length <= 1 and grounds.starts:
            # (A string that must be longer is left free: no piece of a short text might
            # be; so is one when the text has no word at all.)
            out.append(
                Span(
                    grounds.text,
                    grounds.bounds,
                    grounds.starts,
                    grounds.ends,
                    seg.min_length,
                    seg.max_length,
                    seg.field,
                    max(grounds.ends, default=0),
                )
            )
        elif isinstance(seg, Num) and seg.grounded:
            found = grounds.integers if seg.integer else grounds.numbers
            out.append(Lit(found, seg.field) if found else seg)
        elif isinstance(seg, Arr):
            out.append(Arr(_bind(seg.items, grounds), seg.min_items, seg.max_items, seg.field))
        elif isinstance(seg, Opt):
            out.append(Opt(_bind(seg.branch, grounds), seg.field))
        else:
            out.append(seg)
    return tuple(out)


def _feed_span(seg: Span, sub: Any, byte: int) -> Any:
    matched, chars, starts = sub
    text = seg.text
    candidates = seg.starts if starts is None else starts
    limit = seg.last_end
    kept = frozenset(i for i in candidates if i + matched < limit and text[i + matched] == byte)
    if not kept:
        return None
    if (next(iter(kept)) + matched) in seg.bounds:  # this byte begins a character
        if chars >= seg.max_length:
            return None
        chars += 1
    return (matched + 1, chars, kept)


def _span_next_bytes(seg: Span, sub: Any) -> list[int]:
    """The bytes that can extend the span from here (sorted, distinct)."""
    matched, _chars, starts = sub
    text = seg.text
    candidates = seg.starts if starts is None else starts
    return sorted({text[i + matched] for i in candidates if i + matched < seg.last_end})
