"""A model's vocabulary as the decoder needs it: every token's bytes (packed), the token
of each single byte, and the tokens that spell forced text exactly."""

from __future__ import annotations

from array import array
from collections.abc import Iterator

from edge_agent.adapters.engine.port import Context
from edge_agent.core.errors import Code, EngineError


class Pieces:
    """The bytes of every token, packed: one blob and an offset table.

    A list of bytes objects costs ~50 bytes a token in Python objects (13 MB for Gemma's
    262K vocabulary); this costs 4 bytes a token plus the text itself.
    """

    def __init__(self, pieces: list[bytes]) -> None:
        self._blob = b"".join(pieces)
        offsets = array("I", [0])
        total = 0
        for piece in pieces:
            total += len(piece)
            offsets.append(total)
        self._offsets = offsets

    def __getitem__(self, token: int) -> bytes:
        return self._blob[self._offsets[token] : self._offsets[token + 1]]

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def all(self) -> Iterator[bytes]:
        for token in range(len(self)):
            yield self[token]


class Vocabulary:
    """Tokenizing and spelling over a context's vocabulary (thread-safe: read only)."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self.pieces = Pieces(ctx.pieces())
        self.byte_tokens: dict[int, int] = {}
        for token, piece in enumerate(self.pieces.all()):
            if len(piece) == 1 and piece[0] not in self.byte_tokens:
                self.byte_tokens[piece[0]] = token

    def tokenize(self, text: str, special: bool) -> list[int]:
        return self._ctx.tokenize(text, special)

    def tokens_for(self, data: bytes) -> list[int]:
        """Tokens whose pieces spell exactly `data` (forced text)."""
        try:
            tokens = self._ctx.tokenize(data.decode("utf-8"), special=False)
        except UnicodeDecodeError:
            tokens = []
        if tokens and b"".join(self.pieces[t] for t in tokens) == data:
            return tokens
        out: list[int] = []
        for byte in data:
            token = self.byte_tokens.get(byte)
            if token is None:
                raise EngineError(Code.INTERNAL_ERROR, f"no token spells byte {byte:#x}")
            out.append(token)
        return out
