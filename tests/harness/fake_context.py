"""An owned fake of the engine's llama.cpp seam (`edge_agent.adapters.engine.port`): a
made-up vocabulary and a table of logits, so the engine's logic (batch steps and shares,
prefix slots, label scoring and calibration, constrained decoding, the layer tap) runs in
milliseconds without a model: `LlamaEngine(Path("fake"), config, TableContext(...))`.

The vocabulary: tokens 0..255 spell one byte each; then the `words` given (multi-byte
pieces the tokenizer prefers, longest first); then the control tokens `<eot>` (closes a
turn) and `<bos>`, which only `special` tokenizing reads and which spell nothing.

The KV cache is modelled as llama.cpp's unified one: `n_ctx` cells, each (position,
token, the sequences holding it); `seq_copy` shares cells, `seq_remove` drops a
sequence's hold and a cell no sequence holds is free; a decode that does not fit returns
NO_ROOM and changes nothing. A decode's logits rows come from `rule(text)`, the text its
sequence spells up to that entry (its pieces, control tokens as their names), which
returns {piece: logit} for the tokens that should stand out; every other token gets
`floor`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from edge_agent.adapters.engine.port import DECODED, NO_ROOM, Vector

EOT, BOS = "<eot>", "<bos>"
Rule = Callable[[str], Mapping[str, float]]


def suffix_table(table: Mapping[str, Mapping[str, float]]) -> Rule:
    """A rule from {text the sequence ends with: {piece: logit}}: the longest key that
    ends the text wins; no key: nothing stands out."""

    def rule(text: str) -> Mapping[str, float]:
        best = max((k for k in table if text.endswith(k)), key=len, default=None)
        return table[best] if best is not None else {}

    return rule


@dataclass
class _Cell:
    pos: int
    token: int
    seqs: set[int] = field(default_factory=set)


class TableContext:
    """`port.Context` over a table of logits (module docstring)."""

    def __init__(
        self,
        words: Sequence[str] = (),
        rule: Rule = lambda _text: {},
        n_ctx: int = 512,
        template: bool = False,
        bos: bool = False,
        floor: float = -5.0,
    ) -> None:
        self._pieces: list[bytes] = [bytes([b]) for b in range(256)]
        self._pieces += [w.encode() for w in words]
        self.eot = len(self._pieces)
        self._pieces.append(b"")
        self._bos_token = self.eot + 1
        self._pieces.append(b"")
        self._names = {self.eot: EOT, self._bos_token: BOS}
        self._words = sorted(
            ((w.encode(), 256 + i) for i, w in enumerate(words)), key=lambda x: -len(x[0])
        )
        self.rule = rule
        self.floor = floor
        self._n_ctx = n_ctx
        self._template = template
        self._add_bos = bos
        self._cells: list[_Cell] = []
        self._rows: dict[int, Vector] = {}
        self.decodes: list[list[tuple[int, int, int, bool]]] = []  # every decode's entries
        self.closed = False
        self.fail_next: list[int] = []  # return codes the next decodes give instead
        self.taps: list[FakeTap] = []

    # ---- port.Context --------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def n_vocab(self) -> int:
        return len(self._pieces)

    @property
    def bos(self) -> int | None:
        return self._bos_token if self._add_bos else None

    @property
    def eos(self) -> int:
        return self.eot

    @property
    def has_template(self) -> bool:
        return self._template

    def decode(
        self,
        tokens: Sequence[int],
        pos: Sequence[int],
        seqs: Sequence[int],
        outputs: Sequence[bool],
    ) -> int:
        assert len(tokens) == len(pos) == len(seqs) == len(outputs) > 0
        assert any(outputs), "llama.cpp crashes on a batch without outputs"
        self.decodes.append(list(zip(tokens, pos, seqs, outputs, strict=True)))
        if self.fail_next:
            return self.fail_next.pop(0)
        if len(self._cells) + len(tokens) > self._n_ctx:
            return NO_ROOM
        self._rows = {}
        for i, (token, p, seq) in enumerate(zip(tokens, pos, seqs, strict=True)):
            self._cells.append(_Cell(p, token, {seq}))
            if outputs[i]:
                self._rows[i] = self.row(self.text_of(seq, up_to=p))
        return DECODED

    def logits(self, index: int) -> Vector:
        return self._rows[index]

    def tokenize(self, text: str, special: bool) -> list[int]:
        data = text.encode()
        out: list[int] = []
        i = 0
        controls = [(n.encode(), t) for t, n in self._names.items()] if special else []
        while i < len(data):
            for piece, token in controls + self._words:
                if data.startswith(piece, i):
                    out.append(token)
                    i += len(piece)
                    break
            else:
                out.append(data[i])
                i += 1
        return out

    def pieces(self) -> list[bytes]:
        return list(self._pieces)

    def seq_remove(self, seq: int, start: int = -1, end: int = -1) -> None:
        lo = 0 if start < 0 else start
        hi = None if end < 0 else end
        for cell in self._cells:
            if seq in cell.seqs and cell.pos >= lo and (hi is None or cell.pos < hi):
                cell.seqs.discard(seq)
        self._cells = [c for c in self._cells if c.seqs]

    def seq_copy(self, src: int, dst: int) -> None:
        for cell in self._cells:
            if src in cell.seqs:
                cell.seqs.add(dst)

    def clear(self) -> None:
        self._cells = []

    def save_sequence(self, seq: int, limit: int) -> bytes | None:
        data = json.dumps([(c.pos, c.token) for c in self._cells if seq in c.seqs]).encode()
        return data if len(data) <= limit else None

    def restore_sequence(self, seq: int, data: bytes) -> bool:
        cells = json.loads(data)
        if len(self._cells) + len(cells) > self._n_ctx:
            return False
        self._cells += [_Cell(p, t, {seq}) for p, t in cells]
        return True

    def chat(self, messages: Sequence[tuple[str, str]]) -> str | None:
        if not self._template:
            return None
        turns = "".join(f"<{role}>{content}{EOT}" for role, content in messages)
        return turns + "<assistant>"

    def tap(self, n_ctx: int, n_threads: int, chunk: int, sequences: int) -> FakeTap:
        tap = FakeTap(self, n_ctx, chunk, sequences)
        self.taps.append(tap)
        return tap

    def close(self) -> None:
        self.closed = True

    # ---- for the tests -------------------------------------------------------------

    def row(self, text: str) -> Vector:
        """The logits `rule` gives after `text`."""
        row = np.full(self.n_vocab, self.floor, dtype=np.float32)
        for piece, logit in self.rule(text).items():
            row[self.token_of(piece)] = logit
        return row

    def token_of(self, piece: str) -> int:
        if piece in (EOT, BOS):
            return self.eot if piece == EOT else self._bos_token
        data = piece.encode()
        for word, token in self._words:
            if word == data:
                return token
        assert len(data) == 1, f"{piece!r} is not a token of this vocabulary"
        return data[0]

    def spell(self, tokens: Sequence[int]) -> str:
        return "".join(
            self._names.get(t) or self._pieces[t].decode("utf-8", "replace") for t in tokens
        )

    def text_of(self, seq: int, up_to: int | None = None) -> str:
        """What a sequence's cells spell, in position order (up to position `up_to`)."""
        cells = sorted(
            (c for c in self._cells if seq in c.seqs and (up_to is None or c.pos <= up_to)),
            key=lambda c: c.pos,
        )
        return self.spell([c.token for c in cells])

    @property
    def cells_used(self) -> int:
        return len(self._cells)

    def sequences_used(self) -> set[int]:
        return {s for c in self._cells for s in c.seqs}


class FakeTap:
    """`port.TapContext` over the same fake: layer n's output at the last token is
    [n, cells of sequence 0, sum of its tokens] (so tests see what was read)."""

    n_layer = 6

    def __init__(self, owner: TableContext, n_ctx: int, chunk: int, sequences: int) -> None:
        self.n_ctx = n_ctx
        self.nbytes = n_ctx * 16
        self._chunk = chunk
        self._sequences = sequences
        self._cells: list[_Cell] = []
        self.decodes: list[tuple[int, int]] = []  # (tokens, position) of every decode
        self.abort_next = 0
        self.closed = False

    def decode(
        self, tokens: Sequence[int], pos: int, want: Collection[int], deepest: int
    ) -> dict[int, Vector | None] | None:
        assert 0 < len(tokens) <= self._chunk
        self.decodes.append((len(tokens), pos))
        if self.abort_next:
            self.abort_next -= 1
            return None
        self._cells += [_Cell(pos + i, t, {0}) for i, t in enumerate(tokens)]
        mine = [c.token for c in self._cells if 0 in c.seqs]
        return {
            n: np.array([n, len(mine), sum(mine)], dtype=np.float32) for n in want if n <= deepest
        }

    def seq_remove(self, seq: int, start: int = -1, end: int = -1) -> None:
        assert 0 <= seq < self._sequences
        for cell in self._cells:
            if seq in cell.seqs and cell.pos >= max(start, 0) and (end < 0 or cell.pos < end):
                cell.seqs.discard(seq)
        self._cells = [c for c in self._cells if c.seqs]

    def seq_copy(self, src: int, dst: int) -> None:
        assert 0 <= dst < self._sequences
        for cell in self._cells:
            if src in cell.seqs:
                cell.seqs.add(dst)

    def close(self) -> None:
        self.closed = True
