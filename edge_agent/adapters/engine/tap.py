"""A tap on a loaded model's layers: the hidden state that a chosen layer gives where a
prompt ends, which is what a profile's learned head reads (docs/profiles.md).

llama.cpp hands out only the last layer's state (`llama_get_embeddings`). For a probe
(a linear head over frozen states) a layer some way down the stack is often the better
one: on the bundled SmolLM2-135M, its layer 22 of 30 reads sensor messages' severity
right 81% of the time where the last layer does 59% (12 rows a label, 5-fold;
docs/performance.md). The tap's context (`context.LlamaTapContext`) gets any layer's output
through llama.cpp's graph callback and skips the layers below the deepest one asked for.

This module is the tap's logic over that context (`port.TapContext`): sequence 0 reads,
and up to PREFIXES other sequences keep the prompt prefixes of the last profiles read
evaluated (least recently used out first), so a profile's jobs evaluate only their own
tokens even when jobs of several learned profiles alternate. A read shares a kept
prefix's cells. The engine's jobs never pay for the tap: it has a context of its own.
"""

from __future__ import annotations

from collections.abc import Collection, Generator, Sequence

from edge_agent.adapters.engine.port import TapContext, Vector
from edge_agent.core.errors import Code, EngineError

# Tokens a read decodes at once: a step of other jobs runs between chunks.
CHUNK = 64
# Prompt prefixes kept evaluated (one per learned profile read lately).
PREFIXES = 4


class LayerTap:
    """Reads chosen layers' outputs at the end of a prompt, on a context of its own."""

    def __init__(self, ctx: TapContext) -> None:
        self._ctx = ctx
        self.n_layer = ctx.n_layer
        self.n_ctx = ctx.n_ctx
        self.nbytes = ctx.nbytes
        self._shown: list[int] = []  # wanted layers the last decode showed (diagnostics)
        # kept prefixes: their tokens -> (sequence, deepest layer computed), oldest first
        self._prefixes: dict[tuple[int, ...], tuple[int, int]] = {}

    def read(
        self, prefix: Sequence[int], own: Sequence[int], layers: Collection[int]
    ) -> Generator[None, object, dict[int, Vector]]:
        """The outputs of `layers` (0-based) at the last of `prefix + own`; yields between
        chunks of at most CHUNK tokens. Cells of the kept prefix are reused."""
        if not own:
            raise EngineError(Code.INFERENCE_ERROR, "nothing to read: the job has no tokens")
        bad = [n for n in layers if not 0 <= n < self.n_layer]
        if bad or not layers:
            raise EngineError(
                Code.INFERENCE_ERROR, f"layers {sorted(bad)} not in 0..{self.n_layer - 1}"
            )
        deepest = max(layers)
        total = len(prefix) + len(own)
        if total + 1 > self.n_ctx:
            raise EngineError(
                Code.CONTEXT_OVERFLOW,
                f"prompt needs {total} tokens; the layer tap's context holds {self.n_ctx}",
            )
        tokens = list(prefix) + list(own)
        for attempt in (1, 2):
            got = yield from self._read_once(tokens, len(prefix), layers, deepest)
            missing = [n for n in layers if got.get(n) is None]
            if not missing:
                return {n: v for n, v in got.items() if v is not None}
            # Seen twice in a test run on a loaded machine (Gemma-3-270M, never reproduced
            # quietly): a decode that showed some layers only. Read once more from nothing
            # before giving up on the job.
            self._forget(tuple(prefix))
            if attempt == 2:
                raise EngineError(
                    Code.INFERENCE_ERROR,
                    f"no output from layers {missing} (shown: {self._shown}; "
                    f"{len(tokens)} tokens, {len(prefix)} of them the prefix)",
                )
        raise AssertionError("unreachable")

    def _read_once(
        self, tokens: list[int], n_prefix: int, layers: Collection[int], deepest: int
    ) -> Generator[None, object, dict[int, Vector | None]]:
        key, total = tuple(tokens[:n_prefix]), len(tokens)
        kept = self._prefixes.pop(key, None)
        if kept is not None and kept[1] < deepest:  # computed too shallow for this read
            self._ctx.seq_remove(kept[0])
            kept = None
        self._ctx.seq_remove(0)
        start = 0
        if kept is not None:
            self._prefixes[key] = kept  # now the most recently used
            self._ctx.seq_copy(kept[0], 0)
            start = n_prefix
        self._make_room(total - start, keep=key)
        got: dict[int, Vector | None] = {}
        try:
            pos = start
            while pos < total:
                # chunks end where the prefix does, so the whole prefix can be kept
                end = min(total, pos + CHUNK, n_prefix if pos < n_prefix else total)
                last = end == total
                shown = self._ctx.decode(tokens[pos:end], pos, layers if last else (), deepest)
                if shown is None:  # aborted: that chunk's cells are gone
                    return {}
                pos = end
                if last:
                    got = shown
                    self._shown = sorted(shown)
                if pos == n_prefix and kept is None and n_prefix:
                    self._keep(key, deepest)
                if not last:
                    yield None
            return got
        finally:
            self._ctx.seq_remove(0)  # kept prefixes stay

    def _keep(self, key: tuple[int, ...], depth: int) -> None:
        """Keep sequence 0's cells (the prefix just read) in a sequence of their own."""
        used = {seq for seq, _ in self._prefixes.values()}
        free = [seq for seq in range(1, PREFIXES + 1) if seq not in used]
        if not free:  # the least recently used prefix goes
            oldest = next(iter(self._prefixes))
            seq, _ = self._prefixes.pop(oldest)
            self._ctx.seq_remove(seq)
            free = [seq]
        self._ctx.seq_copy(0, free[0])
        self._prefixes[key] = (free[0], depth)

    def _make_room(self, tokens: int, keep: tuple[int, ...]) -> None:
        """Drop kept prefixes (oldest first, `keep` last) until `tokens` more cells fit."""
        while self._prefixes and sum(len(k) for k in self._prefixes) + tokens + 1 > self.n_ctx:
            victims = [k for k in self._prefixes if k != keep] or [keep]
            seq, _ = self._prefixes.pop(victims[0])
            self._ctx.seq_remove(seq)

    def _forget(self, key: tuple[int, ...]) -> None:
        kept = self._prefixes.pop(key, None)
        if kept is not None:
            self._ctx.seq_remove(kept[0])

    def close(self) -> None:
        self._ctx.close()
