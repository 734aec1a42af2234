"""`LlamaEngine`: one model, one context, the engine's public face.

One `LlamaEngine` is owned by one thread (the scheduler's); llama.cpp's own threads do
the maths. Jobs run as tasks (`core.inference.Task`): each is a generator that yields the
tokens it needs evaluated next (need.py), and `step` puts every running task's tokens into
one batch (one `llama_decode`, batch.py), so several jobs share each pass over the weights.

Why the C API and not `Llama.create_completion`: classification is scored, not sampled
(classify.py), extraction is decoded under `constraint.JsonConstraint` (extract.py), and
the evaluated prompt prefix is kept in the KV cache and reused (prefix.py). See
docs/performance.md for the figures and docs/architecture.md for the package's map.

This module only composes: the context (context.py, the one module that calls llama.cpp,
or any `port.Context`, such as the tests' table of logits) and the logic above it.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np

from edge_agent.adapters.engine import tap as tap_module
from edge_agent.adapters.engine.batch import Batcher
from edge_agent.adapters.engine.classify import classify
from edge_agent.adapters.engine.config import EngineConfig, ModelFacts
from edge_agent.adapters.engine.context import LlamaContext, release_free_heap
from edge_agent.adapters.engine.extract import extract
from edge_agent.adapters.engine.need import WAIT, Gen, Need, Run
from edge_agent.adapters.engine.parts import Parts, read_prompt
from edge_agent.adapters.engine.port import Context
from edge_agent.adapters.engine.prefix import PrefixSlots
from edge_agent.adapters.engine.sequences import Sequences
from edge_agent.adapters.engine.shapes import Shapes
from edge_agent.adapters.engine.tap import LayerTap
from edge_agent.adapters.engine.vocab import Vocabulary
from edge_agent.core.constraint import JsonConstraint
from edge_agent.core.errors import Code, JobError
from edge_agent.core.inference import (
    Classification,
    Embedding,
    Extraction,
    StopCheck,
    Task,
    Timings,
    run_alone,
)
from edge_agent.core.prompt import PromptPlan


class LlamaEngine:
    """A loaded GGUF model ready to classify and extract."""

    def __init__(self, path: Path, config: EngineConfig, context: Context | None = None) -> None:
        """Load `path` with llama.cpp, or run over `context` (tests' owned fake)."""
        self.path = path
        self.config = config
        if context is None:
            loaded = LlamaContext(path, config)
            self.facts: ModelFacts = loaded.facts
            context = loaded
        else:
            self.facts = ModelFacts(
                architecture="fake", description="a context without a model", n_params=0,
                n_vocab=context.n_vocab, n_layer=0, n_ctx_train=context.n_ctx,
                n_ctx=context.n_ctx, file_bytes=0, chat_template=context.has_template,
            )  # fmt: skip
        self._ctx = context
        self.stats: dict[str, int] = {}
        self._parts = Parts(
            ctx=context,
            config=config,
            vocab=Vocabulary(context),
            shapes=Shapes(context),
            sequences=Sequences(context, config),
            prefixes=PrefixSlots(
                context, config.prefix_slots, config.prefix_cache_bytes, self.stats
            ),
            stats=self.stats,
        )
        self._batcher = Batcher(context, config, self._parts.prefixes, self.stats)
        self._tap: LayerTap | None = None  # made when a learned profile first reads layers
        self._tap_reading = False
        release_free_heap()

    @property
    def capacity(self) -> int:
        """Jobs held at once (`jobs.parallel`, a KV sequence each); the scheduler starts no
        more (core/slots.py)."""
        return self.config.parallel

    # ---- tasks -------------------------------------------------------------------------

    def begin_classify(self, plan: PromptPlan, text: str, labels: Sequence[str]) -> Task:
        """A task that scores every label as the answer to `text` and corrects the scores
        for the prompt's own bias (contextual calibration, `calibration_texts`); both
        sets of probabilities sum to 1, and the label is the best calibrated one."""
        run = Run()
        run.gen = classify(self._parts, run, plan, text, tuple(labels))
        return Task(run)

    def begin_extract(
        self, plan: PromptPlan, text: str, constraint: JsonConstraint, max_tokens: int
    ) -> Task:
        """A task that generates JSON for `text` that the constraint (hence the schema)
        accepts."""
        run = Run()
        run.gen = extract(self._parts, run, plan, text, constraint, max_tokens)
        return Task(run)

    def begin_embed(self, plan: PromptPlan, text: str, layers: Collection[int]) -> Task:
        """A task that reads the prompt of `plan` around `text` as a job would, and gives
        the outputs of `layers` where its answer would begin (an `Embedding`): what a
        profile's learned head reads. It runs on the layer tap's own context (tap.py),
        a chunk per step, its prefix kept there."""
        run = Run()
        run.gen = self._embed(plan, text, tuple(layers))
        return Task(run)

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
        self._batcher.step(tasks, groups, also_active)

    def drop(self, task: Task) -> None:
        """Stop a task and free its cells (its generator's cleanup runs now)."""
        self._batcher.drop(task)

    # ---- one job alone (tools, evaluation, learning); the agent batches tasks ----------

    def classify(
        self,
        plan: PromptPlan,
        text: str,
        labels: Sequence[str],
        stop: StopCheck = lambda: False,
    ) -> Classification:
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
        out = run_alone(self, self.begin_extract(plan, text, constraint, max_tokens), stop)
        assert isinstance(out, Extraction)
        return out

    def embed(
        self, plan: PromptPlan, text: str, layers: Collection[int], stop: StopCheck = lambda: False
    ) -> Embedding:
        out = run_alone(self, self.begin_embed(plan, text, layers), stop)
        assert isinstance(out, Embedding)
        return out

    def generate_free(self, plan: PromptPlan, text: str, n_tokens: int) -> Timings:
        """Greedy generation without any constraint, for benchmarks."""
        run = Run()
        run.gen = self._free(run, plan, text, n_tokens)
        out = run_alone(self, Task(run), lambda: False)
        assert isinstance(out, Timings)
        return out

    # ---- what a job would need (any thread: these only tokenize) ------------------------

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
        job)."""
        shapes = self._parts.shapes
        shape = shapes.get(plan)
        prompt = len(shape.prefix_tokens) + len(shapes.job_tokens(shape, text))
        answer = 0
        if labels is not None:
            tokens, with_end = shapes.label_tokens(shape, tuple(labels))
            answer = sum(len(t) if with_end else len(t) - 1 for t in tokens)
        if constraint is not None:
            answer = constraint.shortest_length()  # bytes: at least as many as its tokens
        need = prompt + answer + 8
        n_ctx = self._ctx.n_ctx
        holds = min(n_ctx, self.config.tap_ctx) if embed else n_ctx
        if need > holds:
            raise JobError(
                Code.CONTEXT_TOO_LONG,
                f"the job needs {need} tokens of context ({prompt} of prompt, {answer} for "
                f"the answer); this agent's context holds {holds} "
                f"({'the layer tap of learned profiles' if embed else 'model.n_ctx'})",
            )
        return need

    def tokens(self, text: str) -> list[int]:
        """`text`'s tokens, as the model reads a job's text."""
        return self._ctx.tokenize(text, special=False)

    def job_tokens(self, plan: PromptPlan, text: str) -> tuple[list[int], list[int]]:
        """(prefix tokens, the job's own tokens) for a job: what the engine evaluates."""
        shapes = self._parts.shapes
        shape = shapes.get(plan)
        return list(shape.prefix_tokens), shapes.job_tokens(shape, text)

    def render_prompt(self, plan: PromptPlan, text: str) -> str:
        """The whole prompt as text (template, fixed part, the job's text), for comparisons
        with other runtimes and for debugging prompts."""
        return self._parts.shapes.prompt_text(plan, text)

    def label_tokens(
        self, plan: PromptPlan, labels: Sequence[str]
    ) -> tuple[list[list[int]], int | None]:
        """Each label's tokens, and the end-of-turn token when it is scored too."""
        shapes = self._parts.shapes
        tokens, with_end = shapes.label_tokens(shapes.get(plan), tuple(labels))
        return [list(t) for t in tokens], shapes.turn_end if with_end else None

    @property
    def tap_bytes(self) -> int:
        """Memory of the layer tap's context (0 until a learned profile reads layers)."""
        return self._tap.nbytes if self._tap is not None else 0

    # ---- lifetime ----------------------------------------------------------------------

    def reset(self) -> None:
        """Clear the KV cache and forget every prefix slot, saved prefix state, prompt
        shape and calibration (no task may be running). Scores then do not depend on what
        ran before: cells laid out in another order move them a little (prefix.py)."""
        self._ctx.clear()
        self._parts.prefixes.reset()
        self._parts.shapes.clear()
        tap, self._tap = self._tap, None
        if tap is not None:
            tap.close()

    def close(self) -> None:
        tap, self._tap = getattr(self, "_tap", None), None
        if tap is not None:
            tap.close()
        ctx = getattr(self, "_ctx", None)
        if ctx is not None:
            ctx.close()

    # ---- the generators of embedding and free generation -------------------------------

    def _embed(self, plan: PromptPlan, text: str, layers: tuple[int, ...]) -> Gen[Embedding]:
        timings = Timings()
        shapes = self._parts.shapes
        shape = shapes.get(plan)
        own = shapes.job_tokens(shape, text)
        tap = self._layer_tap()
        while self._tap_reading:  # the tap holds one sequence: one read at a time
            yield WAIT
        self._tap_reading = True
        start = time.perf_counter()
        reading = tap.read(shape.prefix_tokens, own, layers)
        try:
            while True:
                next(reading)
                yield WAIT  # a chunk per step: other jobs' steps run between
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
            n_ctx = min(self._ctx.n_ctx, self.config.tap_ctx)
            self._tap = LayerTap(
                self._ctx.tap(
                    n_ctx, self.config.n_threads_batch, tap_module.CHUNK, 1 + tap_module.PREFIXES
                )
            )
        return self._tap

    def _free(self, run: Run, plan: PromptPlan, text: str, n_tokens: int) -> Gen[Timings]:
        timings = Timings()
        parts = self._parts
        shape = parts.shapes.get(plan)
        parts.sequences.take(run)
        try:
            logits = yield from read_prompt(parts, run, shape, text, timings)
            start = time.perf_counter()
            for _ in range(min(n_tokens, self._ctx.n_ctx - run.pos)):
                token = int(np.argmax(logits))
                rows = yield Need.one_run([token], run.pos, run.seq)
                logits = rows[0]
                run.pos += 1
                timings.completion_tokens += 1
            timings.gen_ms = (time.perf_counter() - start) * 1000.0
        finally:
            parts.sequences.release(run)
        return timings
