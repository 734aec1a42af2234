"""The seam between the engine's own logic and llama.cpp: what the code above needs of a
loaded model's context (`Context`) and of the layer tap's (`TapContext`).

`context.py` implements both over llama.cpp's C API and is the only module that touches
the bindings; everything else in this package (batch steps and their shares, prefix
slots, prompt shapes, label scoring and calibration, constrained decoding) works through
these calls, so tests run it against an owned fake holding a table of logits
(tests/harness/fake_context.py) in milliseconds, without a model.

Positions and sequences are llama.cpp's: a sequence is a list of cells (token, position)
in one KV cache shared by all sequences; `seq_copy` makes another sequence share cells
(bookkeeping, not a copy), `seq_remove` drops a sequence's cells in [start, end) (-1:
open-ended), and a cell no sequence holds is free.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float32]
# A decode's result, as llama_decode returns it: 0 done, 1 no room in the KV cache
# (nothing was evaluated), anything else an error.
DECODED, NO_ROOM = 0, 1


class Context(Protocol):
    """One model's inference context: decode batches, read logits, the vocabulary, the
    KV cache's sequences and their saved states, the chat template."""

    @property
    def n_ctx(self) -> int: ...

    @property
    def n_vocab(self) -> int: ...

    @property
    def bos(self) -> int | None:
        """The token every prompt starts with, or None when the model adds none."""

    @property
    def eos(self) -> int: ...

    @property
    def has_template(self) -> bool: ...

    def decode(
        self,
        tokens: Sequence[int],
        pos: Sequence[int],
        seqs: Sequence[int],
        outputs: Sequence[bool],
    ) -> int:
        """Evaluate one batch (entry i: token, position, sequence, logits wanted); DECODED,
        NO_ROOM or another error code. At least one entry wants logits."""

    def logits(self, index: int) -> Vector:
        """The logits of the last decode's entry `index` (lent: valid until the next
        decode)."""

    def tokenize(self, text: str, special: bool) -> list[int]:
        """`text`'s tokens; `special`: control-token text is read as those tokens."""

    def pieces(self) -> list[bytes]:
        """The bytes every token spells, by token id."""

    def seq_remove(self, seq: int, start: int = -1, end: int = -1) -> None: ...

    def seq_copy(self, src: int, dst: int) -> None: ...

    def clear(self) -> None:
        """Empty the whole KV cache."""

    def save_sequence(self, seq: int, limit: int) -> bytes | None:
        """A sequence's cells as bytes, or None when they take more than `limit`."""

    def restore_sequence(self, seq: int, data: bytes) -> bool:
        """Put saved cells back into an empty sequence; False when that failed."""

    def chat(self, messages: Sequence[tuple[str, str]]) -> str | None:
        """(role, content) messages rendered by the model's chat template and the start of
        the assistant's turn; None without a template llama.cpp can apply."""

    def tap(self, n_ctx: int, n_threads: int, chunk: int, sequences: int) -> TapContext:
        """A context of its own over the same weights that reads layers' outputs, `chunk`
        tokens a decode at most, with `sequences` sequences."""

    def close(self) -> None:
        """Free what the context holds (its taps are closed by their owner first)."""


class TapContext(Protocol):
    """The layer tap's context: sequence 0 reads, others keep prefixes."""

    n_ctx: int
    n_layer: int
    nbytes: int

    def decode(
        self, tokens: Sequence[int], pos: int, want: Collection[int], deepest: int
    ) -> dict[int, Vector | None] | None:
        """Evaluate `tokens` at `pos` in sequence 0; the outputs of the `want` layers at the
        last token (None for a layer shown but unreadable; a layer not shown is absent),
        computing no layer deeper than `deepest`. None: llama.cpp aborted the decode and
        dropped its cells."""

    def seq_remove(self, seq: int, start: int = -1, end: int = -1) -> None: ...

    def seq_copy(self, src: int, dst: int) -> None: ...

    def close(self) -> None: ...
