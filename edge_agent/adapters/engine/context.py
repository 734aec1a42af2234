"""llama.cpp's side of the engine: the one module that calls its C API (the ctypes
bindings of `bindings.py`). `LlamaContext` holds a loaded model and its inference context
and offers what `port.Context` names; `LlamaTapContext` is the layer tap's own context
over the same weights (`port.TapContext`). The logic above them (batching, prefixes,
scoring, decoding) lives in the other modules of this package and never sees a pointer.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import threading
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.adapters.engine.bindings import bindings as llama
from edge_agent.adapters.engine.config import EngineConfig, ModelFacts
from edge_agent.adapters.engine.port import Vector
from edge_agent.core.errors import Code, EngineError, ModelLoadError

MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ
_backend_lock = threading.Lock()
_backend_ready = False
# llama.cpp logs through this C callback; keep a reference so it is never collected.
_LOG_CALLBACK: Any = None
_GGML_TYPE_F32 = 0
_LAYER = b"l_out-"


def _ensure_backend() -> None:
    global _backend_ready, _LOG_CALLBACK
    with _backend_lock:
        if _backend_ready:
            return
        _LOG_CALLBACK = llama.llama_log_callback(lambda _level, _text, _data: None)
        llama.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        llama.llama_backend_init()
        _backend_ready = True


def _context_params(config: EngineConfig) -> Any:
    """llama.cpp's context parameters for this configuration."""
    ctx_params = llama.llama_context_default_params()
    ctx_params.n_ctx = config.n_ctx
    ctx_params.n_batch = config.n_batch
    ctx_params.n_ubatch = min(config.n_ubatch, config.n_batch)
    if config.sequences > MAX_SEQUENCES:
        raise ModelLoadError(
            f"{config.sequences} KV sequences asked (prefix slots + parallel jobs + labels); "
            f"llama.cpp holds at most {MAX_SEQUENCES}"
        )
    ctx_params.n_seq_max = config.sequences
    ctx_params.n_threads = config.n_threads
    ctx_params.n_threads_batch = config.n_threads_batch
    # One KV buffer shared by all sequences: label sequences borrow the prompt's cells
    # (seq_cp is bookkeeping, not a copy) instead of splitting n_ctx per sequence.
    ctx_params.kv_unified = True
    # Keep the whole window for sliding-window models (Gemma 3) so the prefix can be
    # trimmed back after each job.
    ctx_params.swa_full = True
    ctx_params.no_perf = True
    if config.kv_cache_type == "q8_0":
        # Quantized V needs flash attention, which llama.cpp has on the CPU as well.
        ctx_params.type_k = llama.GGML_TYPE_Q8_0
        ctx_params.type_v = llama.GGML_TYPE_Q8_0
        ctx_params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_ENABLED
    return ctx_params


class _LlamaCells:
    """What both of llama.cpp's contexts here share: a context, its memory (the KV
    cache's sequences) and one batch."""

    _ctx: Any = None
    _mem: Any = None
    _batch: Any = None

    def seq_remove(self, seq: int, start: int = -1, end: int = -1) -> None:
        llama.llama_memory_seq_rm(self._mem, seq, start, end)

    def seq_copy(self, src: int, dst: int) -> None:
        llama.llama_memory_seq_cp(self._mem, src, dst, -1, -1)

    def _fill(
        self,
        tokens: Sequence[int],
        pos: Sequence[int],
        seqs: Sequence[int],
        outputs: Sequence[bool],
    ) -> None:
        batch = self._batch
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = pos[i]
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seqs[i]
            batch.logits[i] = outputs[i]
        batch.n_tokens = len(tokens)

    def _free(self) -> None:
        if self._batch is not None:
            llama.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama.llama_free(self._ctx)
            self._ctx = None


class LlamaContext(_LlamaCells):
    """A GGUF model loaded by llama.cpp, with one inference context and one batch."""

    def __init__(self, path: Path, config: EngineConfig) -> None:
        _ensure_backend()
        params = llama.llama_model_default_params()
        model = llama.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise ModelLoadError(
                f"llama.cpp could not load {path} (not a GGUF file, an architecture this "
                "build does not support, or not enough memory)"
            )
        self._model = model
        self._vocab = llama.llama_model_get_vocab(model)
        try:
            ctx_params = _context_params(config)
        except ModelLoadError:
            llama.llama_model_free(model)
            raise
        ctx = llama.llama_init_from_model(model, ctx_params)
        if not ctx:
            llama.llama_model_free(model)
            raise ModelLoadError(
                f"llama.cpp could not create a context for {path} (n_ctx={config.n_ctx}); "
                "likely not enough memory"
            )
        self._ctx = ctx
        self._mem = llama.llama_get_memory(ctx)
        self._batch = llama.llama_batch_init(config.n_batch, 0, 1)
        self._n_vocab = int(llama.llama_vocab_n_tokens(self._vocab))
        self._n_ctx = int(llama.llama_n_ctx(ctx))
        template = llama.llama_model_chat_template(model, None)
        self._template: bytes | None = template or None
        add_bos = bool(llama.llama_vocab_get_add_bos(self._vocab))
        self._bos = int(llama.llama_vocab_bos(self._vocab)) if add_bos else None
        self._eos = int(llama.llama_vocab_eos(self._vocab))
        self.facts = self._facts(path)

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    @property
    def bos(self) -> int | None:
        return self._bos

    @property
    def eos(self) -> int:
        return self._eos

    @property
    def has_template(self) -> bool:
        return self._template is not None

    def decode(
        self,
        tokens: Sequence[int],
        pos: Sequence[int],
        seqs: Sequence[int],
        outputs: Sequence[bool],
    ) -> int:
        self._fill(tokens, pos, seqs, outputs)
        return int(llama.llama_decode(self._ctx, self._batch))

    def logits(self, index: int) -> Vector:
        ptr = llama.llama_get_logits_ith(self._ctx, index)
        if not ptr:
            raise EngineError(Code.INFERENCE_ERROR, "no logits for that position")
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))

    def tokenize(self, text: str, special: bool) -> list[int]:
        data = text.encode("utf-8")
        size = len(data) + 8
        for _ in range(2):
            buf = (llama.llama_token * size)()
            n = llama.llama_tokenize(self._vocab, data, len(data), buf, size, False, special)
            if n >= 0:
                return list(buf[:n])
            size = -n
        raise EngineError(Code.INTERNAL_ERROR, "tokenizer buffer sizing failed")

    def pieces(self) -> list[bytes]:
        pieces: list[bytes] = []
        buf = ctypes.create_string_buffer(256)
        for token in range(self._n_vocab):
            n = llama.llama_token_to_piece(self._vocab, token, buf, 256, 0, False)
            pieces.append(buf.raw[:n] if n > 0 else b"")
        return pieces

    def clear(self) -> None:
        llama.llama_memory_clear(self._mem, True)

    def save_sequence(self, seq: int, limit: int) -> bytes | None:
        size = llama.llama_state_seq_get_size(self._ctx, seq)
        if size <= 0 or size > limit:
            return None
        buf = (ctypes.c_uint8 * size)()
        if llama.llama_state_seq_get_data(self._ctx, buf, size, seq) != size:
            return None
        return bytes(buf)

    def restore_sequence(self, seq: int, data: bytes) -> bool:
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        return bool(llama.llama_state_seq_set_data(self._ctx, buf, len(data), seq) == len(data))

    def chat(self, messages: Sequence[tuple[str, str]]) -> str | None:
        if self._template is None:
            return None
        chat = (llama.llama_chat_message * len(messages))()
        keep: list[bytes] = []  # the C strings must outlive the call
        for i, (role, content) in enumerate(messages):
            role_b, content_b = role.encode(), content.encode()
            keep.extend((role_b, content_b))
            chat[i].role = role_b
            chat[i].content = content_b
        size = 4096
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = llama.llama_chat_apply_template(
                self._template, chat, len(messages), True, buf, size
            )
            if n < 0:
                return None  # a template llama.cpp does not know: use the plain format
            if n <= size:
                return buf.raw[:n].decode("utf-8")
            size = n + 1
        return None  # pragma: no cover

    def tap(self, n_ctx: int, n_threads: int, chunk: int, sequences: int) -> LlamaTapContext:
        return LlamaTapContext(self._model, n_ctx, n_threads, chunk, sequences)

    def close(self) -> None:
        self._free()
        if getattr(self, "_model", None):
            llama.llama_model_free(self._model)
            self._model = None

    def _facts(self, path: Path) -> ModelFacts:
        buf = ctypes.create_string_buffer(256)
        n = llama.llama_model_meta_val_str(self._model, b"general.architecture", buf, 256)
        arch = buf.value.decode() if n > 0 else "unknown"
        llama.llama_model_desc(self._model, buf, 256)
        return ModelFacts(
            architecture=arch,
            description=buf.value.decode(errors="replace"),
            n_params=int(llama.llama_model_n_params(self._model)),
            n_vocab=self._n_vocab,
            n_layer=int(llama.llama_model_n_layer(self._model)),
            n_ctx_train=int(llama.llama_model_n_ctx_train(self._model)),
            n_ctx=self._n_ctx,
            file_bytes=path.stat().st_size,
            chat_template=self._template is not None,
        )


def release_free_heap() -> None:
    """Give back to the OS the heap that loading left free (token tables built and
    dropped, llama.cpp's loader scratch): glibc keeps it otherwise, and it counts in RSS."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


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


class LlamaTapContext(_LlamaCells):
    """The layer tap's context over a loaded model (weights shared; its KV cache and
    compute buffer its own: `nbytes`). Layers' outputs come through llama.cpp's graph
    callback (`cb_eval`: the scheduler shows each computed tensor; its `l_out-N` tensors
    are the layers' outputs); returning False once the deepest layer asked for is shown
    cancels the rest of the graph. The callback runs only for this context's decodes."""

    def __init__(self, model: Any, n_ctx: int, n_threads: int, chunk: int, sequences: int) -> None:
        self._ggml = _ggml()
        self.n_layer = int(llama.llama_model_n_layer(model))
        self.n_embd = int(llama.llama_model_n_embd(model))
        self._want: dict[int, Vector | None] = {}
        self._asked: set[int] = set()
        self._stop_after = -1
        self._callback = llama.ggml_backend_sched_eval_callback(self._on_tensor)
        params = llama.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = chunk
        params.n_ubatch = chunk
        params.n_seq_max = sequences
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
        self._batch = llama.llama_batch_init(chunk, 0, 1)
        self.n_ctx = int(llama.llama_n_ctx(ctx))
        n_head = max(1, int(llama.llama_model_n_head(model)))
        n_head_kv = int(llama.llama_model_n_head_kv(model))
        # its KV cache (f16 keys and values) and one chunk's compute buffer, roughly
        self.nbytes = self.n_ctx * self.n_layer * 2 * (self.n_embd // n_head) * n_head_kv * 2
        self.nbytes += chunk * self.n_embd * 4 * 16

    def decode(
        self, tokens: Sequence[int], pos: int, want: Collection[int], deepest: int
    ) -> dict[int, Vector | None] | None:
        n = len(tokens)
        self._fill(tokens, range(pos, pos + n), [0] * n, [i == n - 1 for i in range(n)])
        self._want, self._stop_after = {}, deepest
        self._asked = set(want)
        try:
            rc = llama.llama_decode(self._ctx, self._batch)
            if rc == 2:  # aborted: llama.cpp removed this chunk's cells
                return None
            if rc != 0:
                raise EngineError(Code.INFERENCE_ERROR, f"llama_decode returned {rc} (layer tap)")
            return dict(self._want)
        finally:
            self._want, self._asked = {}, set()

    def close(self) -> None:
        self._free()

    def _on_tensor(self, tensor: int, ask: bool, _user: object) -> bool:
        """llama.cpp's scheduler asks for each computed tensor (`ask`) and then shows the
        ones asked for; returning False while showing cancels the rest of the graph."""
        try:
            name = self._ggml.ggml_get_name(tensor)
            if not name or not name.startswith(_LAYER):
                return not ask  # not asked for; when shown anyway, go on
            layer = int(name[len(_LAYER) :])
            if ask:
                return layer in self._asked or layer == self._stop_after
            if layer in self._asked:
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
