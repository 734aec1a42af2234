"""A tap on a loaded model's layers: the hidden state that a chosen layer gives where a
prompt ends, which is what a profile's learned head reads (docs/profiles.md).

llama.cpp hands out only the last layer's state (`llama_get_embeddings`). For a probe
(a linear head over frozen states) a layer some way down the stack is often the better
one: on the bundled SmolLM2-135M, its layer 22 of 30 reads sensor messages' severity
right 81% of the time where the last layer does 59% (12 rows a label, 5-fold;
docs/performance.md). The tap gets any layer's output through llama.cpp's documented
graph callback (`cb_eval`: the scheduler shows each computed tensor; its `l_out-N` tensors
are the layers' outputs), and cancels the rest of the graph once the deepest layer asked
for is computed, so reading layer 22 skips the last 8 layers and the output head.

It keeps its own llama.cpp context over the engine's model (weights are shared; its KV
cache and compute buffer are its own: `nbytes`): sequence 0 reads, and up to PREFIXES
other sequences keep the prompt prefixes of the last profiles read evaluated (least
recently used out first), so a profile's jobs evaluate only their own tokens even when
jobs of several learned profiles alternate. A read shares a kept prefix's cells
(`seq_cp` on a unified KV cache is bookkeeping, not a copy). The
callback runs in the thread that decodes, only for this context's decodes: the engine's
jobs never pay for it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Collection, Generator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.adapters.llama_lib import bindings as llama
from edge_agent.core.errors import Code, EngineError

Vector = npt.NDArray[np.float32]
_GGML_TYPE_F32 = 0
_LAYER = b"l_out-"
# Tokens a read decodes at once: a step of other jobs runs between chunks.
CHUNK = 64
# Prompt prefixes kept evaluated (one per learned profile read lately).
PREFIXES = 4


class _Aborted(Exception):
    """llama_decode returned 2: llama.cpp dropped that chunk's cells."""


def _ggml() -> Any:
    """libggml-base, the library llama.cpp's tensors live in (shipped beside libllama)."""
    here = Path(llama.__file__).parent / "lib"
    names = sorted(here.glob("libggml-base.*")) if here.is_dir() else []
    found = [str(p) for p in names] or [ctypes.util.find_library("ggml-base") or ""]
    for path in found:
        if not path:
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        lib.ggml_get_name.restype = ctypes.c_char_p
        lib.ggml_get_name.argtypes = [ctypes.c_void_p]
        lib.ggml_nelements.restype = ctypes.c_int64
        lib.ggml_nelements.argtypes = [ctypes.c_void_p]
        lib.ggml_is_contiguous.restype = ctypes.c_bool
        lib.ggml_is_contiguous.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_tensor_get.restype = None
        lib.ggml_backend_tensor_get.argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
        ]  # fmt: skip
        return lib
    raise EngineError(
        Code.INFERENCE_ERROR,
        "libggml-base (shipped with llama-cpp-python) was not found: cannot read the "
        "model's layers for a learned profile",
    )


class LayerTap:
    """Reads chosen layers' outputs at the end of a prompt, on a context of its own."""

    def __init__(self, model: Any, n_ctx: int, n_threads: int) -> None:
        self._ggml = _ggml()
        self.n_layer = int(llama.llama_model_n_layer(model))
        self.n_embd = int(llama.llama_model_n_embd(model))
        self._want: dict[int, Vector | None] = {}
        self._shown: list[int] = []  # wanted layers the last decode showed (diagnostics)
        self._stop_after = -1
        self._callback = llama.ggml_backend_sched_eval_callback(self._on_tensor)
        params = llama.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = CHUNK
        params.n_ubatch = CHUNK
        params.n_seq_max = 1 + PREFIXES
        params.kv_unified = True  # kept prefixes share their cells with reads
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.swa_full = True  # the prefix is trimmed back to after each read
        params.no_perf = True
        params.cb_eval = self._callback
        ctx = llama.llama_init_from_model(model, params)
        if not ctx:
            raise EngineError(
                Code.INFERENCE_ERROR, "llama.cpp could not create the layer tap's context"
            )
        self._ctx = ctx
        self._mem = llama.llama_get_memory(ctx)
        self._batch = llama.llama_batch_init(CHUNK, 0, 1)
        self.n_ctx = int(llama.llama_n_ctx(ctx))
        # kept prefixes: their tokens -> (sequence, deepest layer computed), oldest first
        self._prefixes: dict[tuple[int, ...], tuple[int, int]] = {}
        n_head = max(1, int(llama.llama_model_n_head(model)))
        n_head_kv = int(llama.llama_model_n_head_kv(model))
        # its KV cache (f16 keys and values) and one chunk's compute buffer, roughly
        self.nbytes = self.n_ctx * self.n_layer * 2 * (self.n_embd // n_head) * n_head_kv * 2
        self.nbytes += CHUNK * self.n_embd * 4 * 16

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
            try:
                got = yield from self._read_once(tokens, len(prefix), layers, deepest)
            except _Aborted:
                got = dict.fromkeys(layers)
            missing = [n for n, v in got.items() if v is None]
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
            llama.llama_memory_seq_rm(self._mem, kept[0], -1, -1)
            kept = None
        llama.llama_memory_seq_rm(self._mem, 0, -1, -1)
        start = 0
        if kept is not None:
            self._prefixes[key] = kept  # now the most recently used
            llama.llama_memory_seq_cp(self._mem, kept[0], 0, -1, -1)
            start = n_prefix
        self._make_room(total - start, keep=key)
        self._stop_after = deepest
        try:
            pos = start
            while pos < total:
                # chunks end where the prefix does, so the whole prefix can be kept
                end = min(total, pos + CHUNK, n_prefix if pos < n_prefix else total)
                last = end == total
                self._want = dict.fromkeys(layers) if last else {}
                self._shown = []
                self._decode(tokens[pos:end], pos)
                pos = end
                if pos == n_prefix and kept is None and n_prefix:
                    self._keep(key, deepest)
                if not last:
                    yield None
            return dict(self._want)
        finally:
            self._want = {}
            llama.llama_memory_seq_rm(self._mem, 0, -1, -1)  # kept prefixes stay

    def _keep(self, key: tuple[int, ...], depth: int) -> None:
        """Keep sequence 0's cells (the prefix just read) in a sequence of their own."""
        used = {seq for seq, _ in self._prefixes.values()}
        free = [seq for seq in range(1, PREFIXES + 1) if seq not in used]
        if not free:  # the least recently used prefix goes
            oldest = next(iter(self._prefixes))
            seq, _ = self._prefixes.pop(oldest)
            llama.llama_memory_seq_rm(self._mem, seq, -1, -1)
            free = [seq]
        llama.llama_memory_seq_cp(self._mem, 0, free[0], -1, -1)
        self._prefixes[key] = (free[0], depth)

    def _make_room(self, tokens: int, keep: tuple[int, ...]) -> None:
        """Drop kept prefixes (oldest first, `keep` last) until `tokens` more cells fit."""
        while self._prefixes and sum(len(k) for k in self._prefixes) + tokens + 1 > self.n_ctx:
            victims = [k for k in self._prefixes if k != keep] or [keep]
            seq, _ = self._prefixes.pop(victims[0])
            llama.llama_memory_seq_rm(self._mem, seq, -1, -1)

    def _forget(self, key: tuple[int, ...]) -> None:
        kept = self._prefixes.pop(key, None)
        if kept is not None:
            llama.llama_memory_seq_rm(self._mem, kept[0], -1, -1)

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            llama.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            llama.llama_free(self._ctx)
            self._ctx = None

    def _decode(self, tokens: Sequence[int], pos: int) -> None:
        batch = self._batch
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = pos + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(tokens) - 1
        batch.n_tokens = len(tokens)
        rc = llama.llama_decode(self._ctx, batch)
        if rc == 2:  # aborted: llama.cpp removed this chunk's cells (read.retries once)
            raise _Aborted
        if rc != 0:
            raise EngineError(Code.INFERENCE_ERROR, f"llama_decode returned {rc} (layer tap)")

    def _on_tensor(self, tensor: int, ask: bool, _user: object) -> bool:
        """llama.cpp's scheduler asks for each computed tensor (`ask`) and then shows the
        ones asked for; returning False while showing cancels the rest of the graph."""
        try:
            name = self._ggml.ggml_get_name(tensor)
            if not name or not name.startswith(_LAYER):
                return not ask  # not asked for; when shown anyway, go on
            layer = int(name[len(_LAYER) :])
            if ask:
                return layer in self._want or layer == self._stop_after
            if layer in self._want:
                self._shown.append(layer)
                self._want[layer] = self._last_row(tensor)
            return layer < self._stop_after
        except Exception:  # noqa: BLE001 - never raise into C; the read reports what is missing
            return True

    def _last_row(self, tensor: int) -> Vector | None:
        """The tensor's last row (the prompt's last token), if it is what a layer's output
        should be: contiguous 32-bit floats, rows of n_embd."""
        if ctypes.c_int.from_address(tensor).value != _GGML_TYPE_F32:
            return None
        if not self._ggml.ggml_is_contiguous(tensor):
            return None
        count = int(self._ggml.ggml_nelements(tensor))
        if count < self.n_embd or count % self.n_embd:
            return None
        row = np.empty(self.n_embd, dtype=np.float32)
        offset = (count - self.n_embd) * 4
        self._ggml.ggml_backend_tensor_get(tensor, row.ctypes.data, offset, self.n_embd * 4)
        return row
