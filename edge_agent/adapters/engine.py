"""The llama.cpp adapter: one model, one context, driven through llama.cpp's C API.

Only this module imports llama_cpp. One `LlamaEngine` is owned by one thread (the
scheduler's); llama.cpp's own threads do the maths.

Jobs run as tasks (`core.inference.Task`): each is a generator that yields the tokens it
needs evaluated next, and `step` puts every running task's tokens into one batch (one
`llama_decode`), so several jobs share each pass over the weights (continuous batching).

Why the C API and not `Llama.create_completion`: classification is scored, not sampled (the
prompt is evaluated once, every label is scored as a continuation in its own KV sequence,
in one batch), extraction is decoded under `constraint.JsonConstraint` (greedy token checked
first, fixed stretches evaluated as one batch), and the evaluated prompt prefix is kept in
the KV cache and reused. See docs/performance.md for the figures.

KV layout (one unified buffer of n_ctx cells): sequences 0..prefix_slots-1 each hold one
prompt prefix (a job shape's fixed part); each running job has its own sequence, which
shares its prefix's cells (`seq_cp` is bookkeeping, not a copy) and adds the job's tokens;
label sequences hold label continuations during scoring and are cleared right after.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import threading
import time
from array import array
from collections.abc import Collection, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from cachetools import LRUCache

from edge_agent.adapters.llama_lib import bindings as llama
from edge_agent.adapters.tap import LayerTap
from edge_agent.core.constraint import JsonConstraint, State
from edge_agent.core.errors import Code, EngineError, JobError, ModelLoadError
from edge_agent.core.fairness import served_after, step_shares
from edge_agent.core.inference import (
    Classification,
    ContextFull,
    Embedding,
    Extraction,
    Interrupted,
    StopCheck,
    Task,
    Timings,
    run_alone,
)
from edge_agent.core.prompt import PromptPlan

_SENTINEL = "\ue000{}\ue001"  # private-use characters: never produced by a chat template
# How many of the likeliest tokens normalise a choice's probability (field confidence).
CONFIDENCE_TOP = 4
_backend_lock = threading.Lock()
_backend_ready = False
# llama.cpp logs through this C callback; keep a reference so it is never collected.
_LOG_CALLBACK: Any = None
MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ
# Prompt tokens a step takes when tasks of several requesters share it (see `step`).
SHARED_STEP_TOKENS = 16


@dataclass(frozen=True)
class EngineConfig:
    n_ctx: int = 2048
    n_threads: int = 1
    n_threads_batch: int = 1
    n_batch: int = 512
    n_ubatch: int = 128
    parallel: int = 1  # jobs in flight at once, each in its own sequence
    prefix_slots: int = 1  # prompt prefixes kept evaluated in the context at once
    label_sequences: int = 32  # for scoring multi-token labels (jobs.max_labels)
    prefix_cache_bytes: int = 32 * 1024 * 1024
    kv_cache_type: str = "f16"  # or "q8_0": half the memory, needs flash attention, slower
    # Content-free texts whose label scores measure a prompt's bias (classify); empty: no
    # calibration. The four of Zhao et al. 2021 ("" is sent as one space).
    calibration_texts: tuple[str, ...] = ("N/A", " ", "[MASK]", "none")
    # The layer tap's context (learned profiles' jobs: prefix and text), at most n_ctx.
    tap_ctx: int = 1024


@dataclass(frozen=True)
class ModelFacts:
    """What llama.cpp says about the loaded file."""

    architecture: str
    description: str
    n_params: int
    n_vocab: int
    n_layer: int
    n_ctx_train: int
    n_ctx: int
    file_bytes: int
    chat_template: bool


@dataclass
class _Shape:
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


_T = TypeVar("_T")
# A job inside the engine: yields what it needs evaluated next, receives the logits rows
# it asked for, and returns its outcome.
_Gen = Generator["_Need", "list[npt.NDArray[np.float32]]", _T]


class _Need:
    """Tokens a task needs evaluated before it can go on: (token, position, sequence,
    logits wanted) entries, taken into steps in order; `rows` collects the logits."""

    __slots__ = ("outputs", "pos", "rows", "seqs", "taken", "tokens")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.pos: list[int] = []
        self.seqs: list[int] = []
        self.outputs: list[bool] = []
        self.rows: list[npt.NDArray[np.float32]] = []
        self.taken = 0

    @classmethod
    def one_run(cls, tokens: Sequence[int], pos: int, seq: int, logits: bool = True) -> _Need:
        """Consecutive tokens of one sequence; logits of the last one (if `logits`)."""
        need = cls()
        n = len(tokens)
        need.tokens = list(tokens)
        need.pos = list(range(pos, pos + n))
        need.seqs = [seq] * n
        need.outputs = [False] * n
        if logits and n:
            need.outputs[-1] = True
        return need

    def add(self, token: int, pos: int, seq: int, logits: bool) -> None:
        self.tokens.append(token)
        self.pos.append(pos)
        self.seqs.append(seq)
        self.outputs.append(logits)

    def left(self) -> int:
        return len(self.tokens) - self.taken

    def waiting_for_tokens(self) -> bool:
        """False for _WAIT: the task waits for a sequence or for a prefix another task
        is building, and is asked again next step."""
        return bool(self.tokens)


_WAIT = _Need()


@dataclass(eq=False)
class _Run:
    """The engine's state for one task."""

    gen: _Gen[Any] | None = None
    need: _Need | None = None  # None: not started (or ended)
    seq: int = -1  # its KV sequence while it holds one
    pos: int = 0  # cells of that sequence: the prefix, then its own tokens


@dataclass(eq=False)
class _Slot:
    """A KV sequence that holds one prompt prefix, shared by the jobs of that shape."""

    seq: int
    key: str | None = None
    tokens: list[int] = field(default_factory=list)
    building: bool = False
    used: int = 0
    keep: bool = True  # save its state when it takes another prefix


def _run_of(task: Task) -> _Run:
    run = task.inner
    assert isinstance(run, _Run), "a task of another engine"
    return run


def _context_params(config: EngineConfig) -> Any:
    """llama.cpp's context parameters for this configuration."""
    ctx_params = llama.llama_context_default_params()
    ctx_params.n_ctx = config.n_ctx
    ctx_params.n_batch = config.n_batch
    ctx_params.n_ubatch = min(config.n_ubatch, config.n_batch)
    n_seq = config.prefix_slots + config.parallel + config.label_sequences
    if n_seq > MAX_SEQUENCES:
        raise ModelLoadError(
            f"{n_seq} KV sequences asked (prefix slots + parallel jobs + labels); "
            f"llama.cpp holds at most {MAX_SEQUENCES}"
        )
    ctx_params.n_seq_max = n_seq
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


def _ensure_backend() -> None:
    global _backend_ready, _LOG_CALLBACK
    with _backend_lock:
        if _backend_ready:
            return
        _LOG_CALLBACK = llama.llama_log_callback(lambda _level, _text, _data: None)
        llama.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        llama.llama_backend_init()
        _backend_ready = True


class LlamaEngine:
    """A loaded GGUF model ready to classify and extract."""

    def __init__(self, path: Path, config: EngineConfig) -> None:
        _ensure_backend()
        self.path = path
        self.config = config
        params = llama.llama_model_default_params()
        model = llama.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise ModelLoadError(
                f"llama.cpp could not load {path} (not a GGUF file, an architecture this "
                "build does not support, or not enough memory)"
            )
        self._model = model
        self._vocab = llama.llama_model_get_vocab(model)
        self._label_seq_count = config.label_sequences
        ctx_params = _context_params(config)
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
        self._tap: LayerTap | None = None  # made when a learned profile first reads layers
        self._tap_reading = False
        self._n_ctx = int(llama.llama_n_ctx(ctx))
        template = llama.llama_model_chat_template(model, None)
        self._template: bytes | None = template or None
        slots = config.prefix_slots
        self._slots = [_Slot(seq) for seq in range(slots)]
        self._free_seqs = list(range(slots + config.parallel - 1, slots - 1, -1))
        first_label = slots + config.parallel
        self._free_label_seqs = list(range(first_label, first_label + config.label_sequences))
        self._tick = 0
        self._served: dict[str, float] = {}  # requester -> tokens evaluated lately
        self._saved = _StateCache(config.prefix_cache_bytes)
        self._shapes: LRUCache[str, _Shape] = LRUCache(maxsize=64)
        # The intake thread tokenizes (the token budget) while the inference thread decodes:
        # llama.cpp's tokenizer only reads the vocabulary, but these caches are shared.
        self._shape_lock = threading.Lock()
        self._pieces = _Pieces(self._piece_table())
        self._byte_tokens = self._single_byte_tokens()
        self._turn_end = self._find_turn_end()
        self.facts = self._facts()
        self.stats = {
            "prefix_hits": 0,
            "prefix_restores": 0,
            "prefix_misses": 0,
            "steps": 0,
            "step_tokens": 0,
        }
        _release_free_heap()

    # ---- public API -----------------------------------------------------------------

    def begin_classify(self, plan: PromptPlan, text: str, labels: Sequence[str]) -> Task:
        """A task that scores every label as the answer to `text` and corrects the scores
        for the prompt's own bias (contextual calibration, `calibration_texts`); both
        sets of probabilities sum to 1, and the label is the best calibrated one."""
        run = _Run()
        run.gen = self._classify(run, plan, text, tuple(labels))
        return Task(run)

    def begin_extract(
        self, plan: PromptPlan, text: str, constraint: JsonConstraint, max_tokens: int
    ) -> Task:
        """A task that generates JSON for `text` that the constraint (hence the schema)
        accepts."""
        run = _Run()
        run.gen = self._extract(run, plan, text, constraint, max_tokens)
        return Task(run)

    def begin_embed(self, plan: PromptPlan, text: str, layers: Collection[int]) -> Task:
        """A task that reads the prompt of `plan` around `text` as a job would, and gives
        the outputs of `layers` where its answer would begin (an `Embedding`): what a
        profile's learned head reads. It runs on the layer tap's own context (tap.py),
        a chunk per step, its prefix kept there."""
        run = _Run()
        run.gen = self._embed(run, plan, text, tuple(layers))
        return Task(run)

    def embed(
        self, plan: PromptPlan, text: str, layers: Collection[int], stop: StopCheck = lambda: False
    ) -> Embedding:
        """One embedding, alone (learning from rows, tools)."""
        out = run_alone(self, self.begin_embed(plan, text, layers), stop)
        assert isinstance(out, Embedding)
        return out

    @property
    def tap_bytes(self) -> int:
        """Memory of the layer tap's context (0 until a learned profile reads layers)."""
        return self._tap.nbytes if self._tap is not None else 0

    def classify(
        self,
        plan: PromptPlan,
        text: str,
        labels: Sequence[str],
        stop: StopCheck = lambda: False,
    ) -> Classification:
        """One classification, alone (tools, evaluation); the agent batches tasks."""
        out = run_alone(self, self.begin_classify(plan, text, labels), stop)
        assert isinstance(out, Classification)
        return out

    def extract(
        self,
        plan: PromptPlan,
        text: str,
        constraint: JsonConstraint,
        max_tokens: int,
        stop: StopCheck = lambda: False,
    ) -> Extraction:
        """One extraction, alone (tools, evaluation); the agent batches tasks."""
        out = run_alone(self, self.begin_extract(plan, text, constraint, max_tokens), stop)
        assert isinstance(out, Extraction)
        return out

    def generate_free(self, plan: PromptPlan, text: str, n_tokens: int) -> Timings:
        """Greedy generation without any constraint, for benchmarks."""
        run = _Run()
        run.gen = self._free(run, plan, text, n_tokens)
        out = run_alone(self, Task(run), lambda: False)
        assert isinstance(out, Timings)
        return out

    def step(
        self,
        tasks: Sequence[Task],
        groups: Sequence[str] | None = None,
        also_active: Collection[str] = (),
    ) -> None:
        """Advance every task by one decode that holds all their next tokens.

        A generating task adds its next token (and any bytes the schema forces); a task
        still reading its prompt adds a chunk (`fairness.step_shares`: the prompt budget
        goes to the group, the requester, served least lately; a lone task takes all of
        `n_batch`), so a long prompt cannot hold up the jobs that are generating, nor
        another requester's short prompt. `groups` names each task's requester (None: one
        group); `also_active`, requesters with no task here that use the engine too.
        Raises ContextFull (nothing moved) when the cells run out even after the cached
        prefixes that no job is building are dropped.
        """
        names = list(groups) if groups is not None else [""] * len(tasks)
        group_of = {id(task): name for task, name in zip(tasks, names, strict=True)}
        live: list[tuple[Task, _Need]] = []
        for task in tasks:
            run = _run_of(task)
            if not task.done and (run.need is None or not run.need.waiting_for_tokens()):
                self._advance(task, [])  # start it, or ask again what it waits for
            if not task.done and run.need is not None and run.need.waiting_for_tokens():
                live.append((task, run.need))
        if not live:
            return
        # A step takes n_ubatch tokens (a lone task n_batch) while one requester uses the
        # engine; while several do, a short job's prompt whole, a long one
        # SHARED_STEP_TOKENS at a time: llama.cpp reads a prompt at about the same speed
        # in chunks of 16 as of 128 tokens (REFERENCE.md: pp16 334, pp64 355 tokens/s), so
        # short steps cost little throughput, and another requester's job waits one short
        # step, not 400-700 ms of a greedy one's prompts (issue 21).
        live_groups = [group_of[id(task)] for task, _ in live]
        wide = self.config.n_batch if len(live) == 1 else self.config.n_ubatch
        plan = step_shares(
            [need.left() for _, need in live],
            live_groups,
            self._served,
            wide,
            min(wide, SHARED_STEP_TOKENS),
            set(also_active) - set(live_groups),
        )
        batch = self._batch
        n = 0
        # (task, its need, first entry taken, entries taken, their first batch index)
        taken: list[tuple[Task, _Need, int, int, int]] = []
        for (task, need), count in zip(live, plan, strict=True):
            if count <= 0:
                continue
            start = need.taken
            for j in range(start, start + count):
                batch.token[n] = need.tokens[j]
                batch.pos[n] = need.pos[j]
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = need.seqs[j]
                batch.logits[n] = need.outputs[j]
                n += 1
            taken.append((task, need, start, count, n - count))
        batch.n_tokens = n
        if not any(batch.logits[i] for i in range(n)):
            batch.logits[n - 1] = True  # llama.cpp crashes on a batch without outputs
        rc = llama.llama_decode(self._ctx, batch)
        if rc == 1 and self._drop_idle_prefixes():
            rc = llama.llama_decode(self._ctx, batch)
        if rc == 1:
            raise ContextFull
        if rc != 0:
            error = EngineError(Code.INFERENCE_ERROR, f"llama_decode returned {rc}")
            for task, *_ in taken:
                self._fail(task, error)
            return
        self.stats["steps"] += 1
        self.stats["step_tokens"] += n
        self._served = served_after(self._served, live_groups, plan)
        self._collect(taken)

    def _collect(self, taken: list[tuple[Task, _Need, int, int, int]]) -> None:
        """After a decode: each task's logits rows, and the tasks whose needs are met go
        on."""
        for _, need, start, count, at in taken:
            for j in range(count):
                if need.outputs[start + j]:
                    need.rows.append(self._logits(at + j))
            need.taken += count
            if need.taken < len(need.tokens):
                need.rows = [row.copy() for row in need.rows]  # the next decode reuses them
        for task, need, *_ in taken:
            if need.taken == len(need.tokens):
                self._advance(task, need.rows)

    def drop(self, task: Task) -> None:
        """Stop a task and free its cells (its generator's cleanup runs now)."""
        run = _run_of(task)
        if run.gen is not None:
            run.gen.close()
        run.need = None
        if not task.done:
            task.error = Interrupted()

    def reset(self) -> None:
        """Clear the KV cache and forget every prefix slot, saved prefix state, prompt
        shape and calibration (no task may be running). Scores then do not depend on what
        ran before: cells laid out in another order move them a little (module docstring)."""
        llama.llama_memory_clear(self._mem, True)
        for slot in self._slots:
            slot.key, slot.tokens, slot.building, slot.used = None, [], False, 0
        self._saved = _StateCache(self.config.prefix_cache_bytes)
        with self._shape_lock:
            self._shapes.clear()
        tap, self._tap = self._tap, None
        if tap is not None:
            tap.close()

    def fits(
        self,
        plan: PromptPlan,
        text: str,
        labels: Sequence[str] | None = None,
        constraint: JsonConstraint | None = None,
        embed: bool = False,
    ) -> int:
        """The context cells a job needs (its prompt, and the label continuations or the
        shortest answer its schema allows); raises JobError `context_too_long` when that
        is more than the context holds (`embed`: the layer tap's, for a learned profile's
        job). Safe to call from another thread than the one that runs jobs: it only
        tokenizes."""
        shape = self._shape(plan)
        prompt = len(shape.prefix_tokens) + len(self._job_tokens(shape, text))
        answer = 0
        if labels is not None:
            tokens, with_end = self._label_tokens(shape, tuple(labels))
            answer = sum(len(t) if with_end else len(t) - 1 for t in tokens)
        if constraint is not None:
            answer = constraint.shortest_length()  # bytes: at least as many as its tokens
        need = prompt + answer + 8
        holds = min(self._n_ctx, self.config.tap_ctx) if embed else self._n_ctx
        if need > holds:
            raise JobError(
                Code.CONTEXT_TOO_LONG,
                f"the job needs {need} tokens of context ({prompt} of prompt, {answer} for "
                f"the answer); this agent's context holds {holds} "
                f"({'the layer tap of learned profiles' if embed else 'model.n_ctx'})",
            )
        return need

    def tokens(self, text: str) -> list[int]:
        """`text`'s tokens, as the model reads a job's text (thread-safe: it only reads the
        vocabulary)."""
        return self._tokenize(text, special=False)

    def job_tokens(self, plan: PromptPlan, text: str) -> tuple[list[int], list[int]]:
        """(prefix tokens, the job's own tokens) for a job: what the engine evaluates."""
        shape = self._shape(plan)
        return list(shape.prefix_tokens), self._job_tokens(shape, text)

    def render_prompt(self, plan: PromptPlan, text: str) -> str:
        """The whole prompt as text (template, fixed part, the job's text), for comparisons
        with other runtimes and for debugging prompts."""
        parts = self._render(plan)
        job_index = len(parts) - 3
        head = "".join(t for t, _ in parts[:job_index])
        tail = "".join(t for t, _ in parts[job_index + 1 :])
        return head + text + tail

    def label_tokens(
        self, plan: PromptPlan, labels: Sequence[str]
    ) -> tuple[list[list[int]], int | None]:
        """Each label's tokens, and the end-of-turn token when it is scored too."""
        tokens, with_end = self._label_tokens(self._shape(plan), tuple(labels))
        return [list(t) for t in tokens], self._turn_end if with_end else None

    def close(self) -> None:
        tap, self._tap = getattr(self, "_tap", None), None
        if tap is not None:
            tap.close()
        if getattr(self, "_batch", None) is not None:
            llama.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            llama.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            llama.llama_model_free(self._model)
            self._model = None

    # ---- prompt shapes and the prefix cache -------------------------------------------

    def _shape(self, plan: PromptPlan) -> _Shape:
        key = plan.key
        with self._shape_lock:
            shape = self._shapes.get(key)
            if shape is not None:
                return shape
        parts = self._render(plan)
        # parts alternate: template text, content, template text, ... then the answer
        # prefix; the content before the last template part is the job's text placeholder,
        # and everything before it is the fixed prefix.
        job_index = len(parts) - 3
        prefix: list[int] = []
        if llama.llama_vocab_get_add_bos(self._vocab):
            prefix.append(int(llama.llama_vocab_bos(self._vocab)))
        for text, is_template in parts[:job_index]:
            prefix.extend(self._tokenize(text, special=is_template))
        suffix = parts[job_index + 1 :]
        tail_text = "".join(text for text, _ in suffix)
        # A label follows the answer prefix as a word would: after a space unless the prompt
        # ends a line (chat templates end with "assistant\n").
        lead = " " if tail_text and not tail_text[-1].isspace() else ""
        shape = _Shape(
            prefix_tokens=prefix, suffix_parts=suffix, label_lead=lead, keep=not plan.once
        )
        with self._shape_lock:
            self._shapes[key] = shape
        return shape

    def _render(self, plan: PromptPlan) -> list[tuple[str, bool]]:
        """Render messages + a job placeholder, split into (text, is_template) parts.

        Message contents come from jobs, so they are tokenized without special-token
        parsing: a sensor cannot inject `<|im_end|>` or similar. The plan's own lead and
        tail around the job's text count as template text (they are ours).
        """
        fixed = plan.fixed
        contents = [m.content for m in fixed] + [""]
        messages = [(m.role, _SENTINEL.format(i)) for i, m in enumerate(fixed)]
        messages.append(("user", plan.lead + _SENTINEL.format(len(fixed)) + plan.tail))
        rendered = self._apply_template(messages) if self._template else None
        if rendered is None:
            rendered = _plain_format(messages)
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

    def _apply_template(self, messages: Sequence[tuple[str, str]]) -> str | None:
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

    def _find_turn_end(self) -> int:
        """The token that closes an assistant turn (scored after each label)."""
        if self._template:
            text = self._apply_template([("user", "u"), ("assistant", "\ue002")])
            if text and "\ue002" in text:
                after = text.split("\ue002", 1)[1]
                tokens = self._tokenize(after, special=True) if after else []
                if tokens:
                    return tokens[0]
        return int(llama.llama_vocab_eos(self._vocab))

    def _job_tokens(self, shape: _Shape, text: str) -> list[int]:
        tokens: list[int] = self._tokenize(text, special=False)
        for part, is_template in shape.suffix_parts:
            tokens.extend(self._tokenize(part, special=is_template))
        return tokens

    # ---- tasks: each job is a generator that yields the tokens it needs evaluated ------

    def _advance(self, task: Task, rows: list[npt.NDArray[np.float32]]) -> None:
        """Resume a task's generator with its logits rows, up to what it needs next."""
        run = _run_of(task)
        assert run.gen is not None
        try:
            run.need = run.gen.send(rows) if run.need is not None else next(run.gen)
        except StopIteration as end:
            run.need = None
            task.outcome = end.value
        except Exception as exc:  # noqa: BLE001 - the job's own error; the scheduler answers
            run.need = None
            task.error = exc

    def _fail(self, task: Task, error: EngineError) -> None:
        run = _run_of(task)
        assert run.gen is not None
        try:
            run.gen.throw(error)
        except StopIteration as end:
            task.outcome = end.value
        except Exception as exc:  # noqa: BLE001
            task.error = exc
        else:  # pragma: no cover - no generator catches the engine's errors
            run.gen.close()
            task.error = error
        run.need = None

    def _classify(
        self, run: _Run, plan: PromptPlan, text: str, labels: tuple[str, ...]
    ) -> _Gen[Classification]:
        timings = Timings()
        shape = self._shape(plan)
        yield from self._take_sequence(run)
        try:
            start = time.perf_counter()
            yield from self._attach_prefix(run, shape.prefix_tokens, timings, shape.keep)
            bias = yield from self._label_bias(run, shape, labels)
            logits = yield from self._own_tokens(run, shape, text, timings)
            timings.prompt_ms = (time.perf_counter() - start) * 1000.0
            start = time.perf_counter()
            logprobs = yield from self._score_labels(run, shape, labels, logits)
            timings.gen_ms = (time.perf_counter() - start) * 1000.0
        finally:
            self._release_sequence(run)
        raw = _normalise(logprobs)
        scores = _normalise({label: lp - bias[label] for label, lp in logprobs.items()})
        top = max(scores, key=scores.__getitem__)
        return Classification(
            label=top, scores=scores, timings=timings, logprobs=logprobs, raw_scores=raw
        )

    def _label_bias(
        self, run: _Run, shape: _Shape, labels: tuple[str, ...]
    ) -> _Gen[dict[str, float]]:
        """log p_cf(label): the label distribution this prompt gives texts that say nothing,
        averaged over `config.calibration_texts` (Zhao et al., "Calibrate Before Use",
        2021). Measured on the first job of a shape and label set, in that job's own
        sequence (rewound to the prefix after each text), then kept."""
        with self._shape_lock:
            known = shape.label_bias.get(labels)
        if known is not None:
            return known
        texts = self.config.calibration_texts
        if not texts:
            return dict.fromkeys(labels, 0.0)
        mean = dict.fromkeys(labels, 0.0)
        prefix = run.pos
        for text in texts:
            logits = yield from self._own_tokens(run, shape, text, Timings())
            scored = yield from self._score_labels(run, shape, labels, logits)
            for label, p in _normalise(scored).items():
                mean[label] += p / len(texts)
            llama.llama_memory_seq_rm(self._mem, run.seq, prefix, -1)
            run.pos = prefix
        bias = {label: math.log(max(p, 1e-12)) for label, p in mean.items()}
        with self._shape_lock:
            shape.label_bias[labels] = bias
        return bias

    def _extract(
        self,
        run: _Run,
        plan: PromptPlan,
        text: str,
        constraint: JsonConstraint,
        max_tokens: int,
    ) -> _Gen[Extraction]:
        timings = Timings()
        shape = self._shape(plan)
        yield from self._take_sequence(run)
        try:
            logits = yield from self._read_prompt(run, shape, text, timings)
            start = time.perf_counter()
            logps: dict[str, float] = {}
            out, truncated = yield from self._constrained(
                run, constraint, logits, max_tokens, timings, logps
            )
            timings.gen_ms = (time.perf_counter() - start) * 1000.0
        finally:
            self._release_sequence(run)
        return Extraction(
            text=out.decode("utf-8"),
            timings=timings,
            truncated=truncated,
            confidence={f: math.exp(lp) for f, lp in logps.items()},
        )

    def _embed(
        self, run: _Run, plan: PromptPlan, text: str, layers: tuple[int, ...]
    ) -> _Gen[Embedding]:
        timings = Timings()
        shape = self._shape(plan)
        own = self._job_tokens(shape, text)
        tap = self._layer_tap()
        while self._tap_reading:  # the tap holds one sequence: one read at a time
            yield _WAIT
        self._tap_reading = True
        start = time.perf_counter()
        reading = tap.read(shape.prefix_tokens, own, layers)
        try:
            while True:
                next(reading)
                yield _WAIT  # a chunk per step: other jobs' steps run between
        except StopIteration as end:
            got = end.value
        finally:
            reading.close()
            self._tap_reading = False
        timings.prompt_ms = (time.perf_counter() - start) * 1000.0
        timings.prompt_tokens = len(own)
        timings.cached_tokens = len(shape.prefix_tokens)
        return Embedding(layers=got, timings=timings)

    def _layer_tap(self) -> LayerTap:
        if self._tap is None:
            self._tap = LayerTap(
                self._model, min(self._n_ctx, self.config.tap_ctx), self.config.n_threads_batch
            )
        return self._tap

    def _free(self, run: _Run, plan: PromptPlan, text: str, n_tokens: int) -> _Gen[Timings]:
        timings = Timings()
        shape = self._shape(plan)
        yield from self._take_sequence(run)
        try:
            logits = yield from self._read_prompt(run, shape, text, timings)
            start = time.perf_counter()
            for _ in range(min(n_tokens, self._n_ctx - run.pos)):
                token = int(np.argmax(logits))
                rows = yield _Need.one_run([token], run.pos, run.seq)
                logits = rows[0]
                run.pos += 1
                timings.completion_tokens += 1
            timings.gen_ms = (time.perf_counter() - start) * 1000.0
        finally:
            self._release_sequence(run)
        return timings

    def _read_prompt(
        self, run: _Run, shape: _Shape, text: str, timings: Timings
    ) -> _Gen[npt.NDArray[np.float32]]:
        """The shape's prefix, then the job's own tokens; the last position's logits."""
        start = time.perf_counter()
        yield from self._attach_prefix(run, shape.prefix_tokens, timings, shape.keep)
        logits = yield from self._own_tokens(run, shape, text, timings)
        timings.prompt_ms = (time.perf_counter() - start) * 1000.0
        return logits

    # ---- sequences and the prompt prefixes they share ---------------------------------

    def _take_sequence(self, run: _Run) -> _Gen[None]:
        while not self._free_seqs:
            yield _WAIT
        run.seq = self._free_seqs.pop()
        run.pos = 0

    def _release_sequence(self, run: _Run) -> None:
        if run.seq < 0:
            return
        llama.llama_memory_seq_rm(self._mem, run.seq, -1, -1)
        self._free_seqs.append(run.seq)
        run.seq = -1

    def _attach_prefix(
        self, run: _Run, prefix: list[int], timings: Timings, keep: bool = True
    ) -> _Gen[None]:
        """Give the job's sequence the shape's prefix: shared cells of a prefix slot (a
        sequence that holds one prompt prefix for every job of that shape), evaluated
        once, restored from a saved state, or built from the longest common start of
        another slot."""
        key = _token_key(prefix)
        while True:
            slot = next((s for s in self._slots if s.key == key), None)
            if slot is not None and not slot.building:
                self.stats["prefix_hits"] += 1
                timings.cached_tokens = len(prefix)
                self._share(slot, run, len(prefix))
                return
            idle = [s for s in self._slots if not s.building]
            if slot is None and idle:
                break
            yield _WAIT  # another job is building this prefix, or every slot is
        victim = min(idle, key=lambda s: s.used)
        self._save_slot(victim)
        saved = self._saved.get(key)
        # The slot's own start is kept when the new prefix shares it (a longer or edited
        # fixed part). Cells copied from another slot's start would do too in theory, but
        # scores then moved by up to 0.02 (attention over cells in another order), so a
        # new prefix is evaluated whole.
        common = _common_prefix(victim.tokens, prefix) if saved is None else 0
        llama.llama_memory_seq_rm(self._mem, victim.seq, common, -1)
        victim.key, victim.tokens, victim.building = key, list(prefix), True
        victim.keep = keep
        try:
            if saved is not None:
                buf = (ctypes.c_uint8 * len(saved)).from_buffer_copy(saved)
                if llama.llama_state_seq_set_data(self._ctx, buf, len(saved), victim.seq) == len(
                    saved
                ):
                    self.stats["prefix_restores"] += 1
                    timings.cached_tokens = len(prefix)
                else:  # restore failed: evaluate it
                    llama.llama_memory_seq_rm(self._mem, victim.seq, -1, -1)
                    saved = None
            if saved is None:
                self.stats["prefix_misses"] += 1
                rest = prefix[common:]
                if rest:
                    yield _Need.one_run(rest, common, victim.seq, logits=False)
                timings.cached_tokens = common
                timings.prompt_tokens += len(rest)
        except BaseException:
            llama.llama_memory_seq_rm(self._mem, victim.seq, -1, -1)
            victim.key, victim.tokens, victim.building = None, [], False
            raise
        victim.building = False
        self._share(victim, run, len(prefix))

    def _share(self, slot: _Slot, run: _Run, length: int) -> None:
        self._tick += 1
        slot.used = self._tick
        llama.llama_memory_seq_cp(self._mem, slot.seq, run.seq, -1, -1)
        run.pos = length

    def _save_slot(self, slot: _Slot) -> None:
        """Keep a slot's prefix state before the slot takes another one."""
        if not slot.tokens or slot.key is None or not slot.keep or slot.key in self._saved:
            return
        if self._saved.capacity <= 0:
            return
        size = llama.llama_state_seq_get_size(self._ctx, slot.seq)
        if size <= 0 or size > self._saved.capacity:
            return
        buf = (ctypes.c_uint8 * size)()
        if llama.llama_state_seq_get_data(self._ctx, buf, size, slot.seq) == size:
            self._saved.put(slot.key, bytes(buf))

    def _drop_idle_prefixes(self) -> bool:
        """Free the cells of prefixes no job is building (under memory pressure); True if
        there was one. Jobs that share a prefix keep their cells."""
        dropped = False
        for slot in self._slots:
            if slot.tokens and not slot.building:
                self._save_slot(slot)
                llama.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
                slot.key, slot.tokens = None, []
                dropped = True
        return dropped

    def _own_tokens(
        self, run: _Run, shape: _Shape, text: str, timings: Timings
    ) -> _Gen[npt.NDArray[np.float32]]:
        """Evaluate the job's own tokens after the prefix; the last position's logits."""
        job = self._job_tokens(shape, text)
        if run.pos + len(job) + 8 > self._n_ctx:
            raise EngineError(
                Code.CONTEXT_OVERFLOW,
                f"prompt needs {run.pos + len(job)} tokens; the context holds {self._n_ctx}",
            )
        rows = yield _Need.one_run(job, run.pos, run.seq)
        run.pos += len(job)
        timings.prompt_tokens += len(job)
        return rows[-1]

    # ---- decoding ---------------------------------------------------------------------

    def _logits(self, index: int) -> npt.NDArray[np.float32]:
        ptr = llama.llama_get_logits_ith(self._ctx, index)
        if not ptr:
            raise EngineError(Code.INFERENCE_ERROR, "no logits for that position")
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))

    def _score_labels(
        self,
        run: _Run,
        shape: _Shape,
        labels: tuple[str, ...],
        first_logits: npt.NDArray[np.float32],
    ) -> _Gen[dict[str, float]]:
        """Log-probability of each label's tokens as the continuation of the prompt.

        Labels that need more than their first token are evaluated together in one batch,
        each in its own KV sequence sharing the prompt's cells. When one label's tokens are
        a prefix of another's, every label also scores the end-of-turn token, so "high"
        and "high_temp" compare fairly.
        """
        label_tokens, with_end = self._label_tokens(shape, labels)
        first = _log_softmax(first_logits)  # before any wait: the row is only lent
        logps = [float(first[tokens[0]]) for tokens in label_tokens]
        todo: list[tuple[int, list[int], list[int]]] = []
        for i, tokens in enumerate(label_tokens):
            inputs = tokens if with_end else tokens[:-1]
            if inputs:
                targets = [*tokens[1:], self._turn_end] if with_end else tokens[1:]
                todo.append((i, inputs, targets))
        if not todo:
            return dict(zip(labels, logps, strict=True))
        if len(todo) > self._label_seq_count:
            raise EngineError(Code.INTERNAL_ERROR, "more labels than label sequences")
        while len(self._free_label_seqs) < len(todo):
            yield _WAIT
        seqs = [self._free_label_seqs.pop() for _ in todo]
        try:
            need = _Need()
            targets_by_row: list[tuple[int, int]] = []
            for (i, inputs, targets), seq in zip(todo, seqs, strict=True):
                llama.llama_memory_seq_cp(self._mem, run.seq, seq, -1, -1)
                for j, token in enumerate(inputs):
                    targets_by_row.append((i, targets[j]))
                    need.add(token, run.pos + j, seq, True)
            rows = yield need
            for (i, target), row in zip(targets_by_row, rows, strict=True):
                logps[i] += float(_log_softmax(row)[target])
        finally:
            for seq in seqs:
                llama.llama_memory_seq_rm(self._mem, seq, -1, -1)
                self._free_label_seqs.append(seq)
        return dict(zip(labels, logps, strict=True))

    def _label_tokens(self, shape: _Shape, labels: tuple[str, ...]) -> tuple[list[list[int]], bool]:
        with self._shape_lock:
            cached = shape.label_tokens.get(labels)
        if cached is not None:
            return cached
        tokens = [self._tokenize(shape.label_lead + label, special=False) for label in labels]
        as_tuples = [tuple(t) for t in tokens]
        with_end = any(
            a != b and len(a) < len(b) and b[: len(a)] == a for a in as_tuples for b in as_tuples
        )
        result = (tokens, with_end)
        with self._shape_lock:
            shape.label_tokens[labels] = result
        return result

    def _constrained(
        self,
        run: _Run,
        constraint: JsonConstraint,
        logits: npt.NDArray[np.float32],
        max_tokens: int,
        timings: Timings,
        confidence: dict[str, float] | None = None,
    ) -> _Gen[tuple[bytes, bool]]:
        """Greedy decoding under the constraint.

        Each step takes the most likely token and checks its bytes against the automaton;
        only when it is rejected are the next candidates checked, best first. Bytes the
        schema forces (keys, punctuation) are evaluated with the next step's token, never
        sampled.
        """
        state = constraint.initial()
        out = bytearray()
        pending: list[int] = []  # tokens chosen or forced, not yet evaluated
        emitted = 0  # every token of the answer, sampled or forced
        chosen = 0  # tokens the model picked (the budget counts these)
        budget = min(max_tokens, self._n_ctx - run.pos - 2)
        truncated = False
        fields = confidence if confidence is not None else {}
        while True:
            forced, state = constraint.forced(state)
            if forced:
                out += forced
                tokens = self._tokens_for(forced)
                pending.extend(tokens)
                emitted += len(tokens)
            if constraint.is_complete(state):
                break
            if run.pos + len(pending) + 1 >= self._n_ctx:
                budget = chosen  # out of context: close the JSON now
            elif pending:
                rows = yield _Need.one_run(pending, run.pos, run.seq)
                logits = rows[-1]
                run.pos += len(pending)
                pending = []
            if chosen >= budget:
                truncated = True
                out += self._finish(constraint, state)
                break
            field = constraint.field_at(state)
            constraint.limit_work(len(out))  # a step past it raises cost_exceeded
            token, next_state = self._choose(constraint, state, logits)
            if field is not None:
                fields[field] = fields.get(field, 0.0) + self._choice_logprob(
                    constraint, state, logits, token
                )
            state = next_state
            chosen += 1
            emitted += 1
            out += self._pieces[token]
            pending.append(token)
        timings.completion_tokens = emitted
        return bytes(out), truncated

    def _choice_logprob(
        self,
        constraint: JsonConstraint,
        state: State,
        logits: npt.NDArray[np.float32],
        token: int,
    ) -> float:
        """log p(token), normalised over the likeliest tokens the constraint accepts here
        (the top CONFIDENCE_TOP): how sure the model was of this choice among the ones it
        could make. Forced bytes are certain and never come here."""
        top = np.argpartition(-logits, CONFIDENCE_TOP)[:CONFIDENCE_TOP]
        candidates = {int(t) for t in top.tolist()} | {token}
        allowed = [t for t in candidates if t == token or self._fits(constraint, state, t)]
        values = np.array([float(logits[t]) for t in allowed], dtype=np.float64)
        peak = float(values.max())
        total = float(np.exp(values - peak).sum())
        return float(logits[token]) - peak - math.log(total)

    def _choose(
        self, constraint: JsonConstraint, state: State, logits: npt.NDArray[np.float32]
    ) -> tuple[int, State]:
        """The most likely token the constraint accepts.

        When none of the likeliest candidates fits (rare: e.g. a string at its length cap
        whose likely tokens are all long), the token spelling the byte the automaton needs
        to finish is taken.
        """
        best = int(np.argmax(logits))
        fitted = self._fits(constraint, state, best)
        if fitted is not None:
            return best, fitted
        # tiny vocabularies (synthetic test models): look at every token
        for width in (min(64, self._n_vocab - 1), min(1024, self._n_vocab - 1)):
            top = np.argpartition(-logits, width)[:width]
            ordered = top[np.argsort(-logits[top])]
            for token in ordered.tolist():
                fitted = self._fits(constraint, state, token)
                if fitted is not None:
                    return int(token), fitted
        byte = constraint.finish_byte(state)
        token = self._byte_tokens.get(byte) if byte is not None else None
        fitted = self._fits(constraint, state, token) if token is not None else None
        if token is None or fitted is None:
            raise EngineError(Code.INTERNAL_ERROR, "no token can continue the JSON")
        return token, fitted

    def _fits(self, constraint: JsonConstraint, state: State, token: int) -> State | None:
        piece = self._pieces[token]
        if not piece:
            return None
        return constraint.feed(state, piece)

    def _finish(self, constraint: JsonConstraint, state: State) -> bytes:
        """Close the JSON as quickly as the schema allows (the token budget ran out)."""
        out = bytearray()
        while not constraint.is_complete(state):
            byte = constraint.finish_byte(state)
            if byte is None:  # pragma: no cover
                break
            next_state = constraint.step(state, byte)
            if next_state is None:  # pragma: no cover
                break
            out.append(byte)
            state = next_state
        return bytes(out)

    # ---- vocabulary -------------------------------------------------------------------

    def _tokenize(self, text: str, special: bool) -> list[int]:
        data = text.encode("utf-8")
        size = len(data) + 8
        for _ in range(2):
            buf = (llama.llama_token * size)()
            n = llama.llama_tokenize(self._vocab, data, len(data), buf, size, False, special)
            if n >= 0:
                return list(buf[:n])
            size = -n
        raise EngineError(Code.INTERNAL_ERROR, "tokenizer buffer sizing failed")

    def _tokens_for(self, data: bytes) -> list[int]:
        """Tokens whose pieces spell exactly `data` (forced text)."""
        try:
            tokens = self._tokenize(data.decode("utf-8"), special=False)
        except UnicodeDecodeError:
            tokens = []
        if tokens and b"".join(self._pieces[t] for t in tokens) == data:
            return tokens
        out: list[int] = []
        for byte in data:
            token = self._byte_tokens.get(byte)
            if token is None:
                raise EngineError(Code.INTERNAL_ERROR, f"no token spells byte {byte:#x}")
            out.append(token)
        return out

    def _piece_table(self) -> list[bytes]:
        pieces: list[bytes] = []
        buf = ctypes.create_string_buffer(256)
        for token in range(self._n_vocab):
            n = llama.llama_token_to_piece(self._vocab, token, buf, 256, 0, False)
            pieces.append(buf.raw[:n] if n > 0 else b"")
        return pieces

    def _single_byte_tokens(self) -> dict[int, int]:
        found: dict[int, int] = {}
        for token, piece in enumerate(self._pieces.all()):
            if len(piece) == 1 and piece[0] not in found:
                found[piece[0]] = token
        return found

    def _facts(self) -> ModelFacts:
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
            file_bytes=self.path.stat().st_size,
            chat_template=self._template is not None,
        )


class _Pieces:
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

    def all(self) -> Iterator[bytes]:
        for token in range(len(self._offsets) - 1):
            yield self[token]


class _StateCache:
    """Saved KV states of prompt prefixes, bounded by their total size, least recently
    used dropped first (cachetools' LRUCache weighing each state by its bytes)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: LRUCache[str, bytes] = LRUCache(maxsize=max(capacity, 1), getsizeof=len)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> bytes | None:
        return self._items.get(key)

    def put(self, key: str, value: bytes) -> None:
        if key in self._items or len(value) > self.capacity:
            return  # a state bigger than the whole cache is not kept (nor evicts the rest)
        self._items[key] = value


def _release_free_heap() -> None:
    """Give back to the OS the heap that loading left free (token tables built and
    dropped, llama.cpp's loader scratch): glibc keeps it otherwise, and it counts in RSS."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _plain_format(messages: Sequence[tuple[str, str]]) -> str:
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


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _token_key(tokens: Sequence[int]) -> str:
    return hashlib.blake2b(np.asarray(tokens, dtype=np.int32).tobytes(), digest_size=16).hexdigest()


def _normalise(logprobs: dict[str, float]) -> dict[str, float]:
    """Probabilities (summing to 1) from log-scores."""
    best = max(logprobs.values())
    weights = {label: math.exp(lp - best) for label, lp in logprobs.items()}
    total = sum(weights.values())
    return {label: w / total for label, w in weights.items()}


def _log_softmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    x = logits.astype(np.float64)
    peak = float(x.max())
    out: npt.NDArray[np.float64] = x - (peak + math.log(float(np.exp(x - peak).sum())))
    return out
