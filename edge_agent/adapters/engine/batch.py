"""The batch step: every running task's next tokens in one decode, so several jobs share
each pass over the weights (continuous batching).

A generating task adds its next token (and any bytes the schema forces); a task still
reading its prompt adds a chunk (`fairness.step_shares`: the prompt budget goes to the
group, the requester, served least lately; a lone task takes all of `n_batch`), so a long
prompt cannot hold up the jobs that are generating, nor another requester's short prompt.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from edge_agent.adapters.engine.config import EngineConfig
from edge_agent.adapters.engine.need import Need, run_of
from edge_agent.adapters.engine.port import DECODED, NO_ROOM, Context, Vector
from edge_agent.adapters.engine.prefix import PrefixSlots
from edge_agent.core.errors import Code, EngineError
from edge_agent.core.fairness import served_after, step_shares
from edge_agent.core.inference import ContextFull, Interrupted, Task

# Prompt tokens a step takes when tasks of several requesters share it (see `step`).
SHARED_STEP_TOKENS = 16


class Batcher:
    """Advances tasks, one decode a step, and remembers whom it served lately."""

    def __init__(
        self, ctx: Context, config: EngineConfig, prefixes: PrefixSlots, stats: dict[str, int]
    ) -> None:
        self._ctx = ctx
        self._config = config
        self._prefixes = prefixes
        self._served: dict[str, float] = {}  # requester -> tokens evaluated lately
        self.stats = stats
        stats.setdefault("steps", 0)
        stats.setdefault("step_tokens", 0)

    def step(
        self,
        tasks: Sequence[Task],
        groups: Sequence[str] | None = None,
        also_active: Collection[str] = (),
    ) -> None:
        """Advance every task by one decode that holds all their next tokens (see
        `LlamaEngine.step`)."""
        names = list(groups) if groups is not None else [""] * len(tasks)
        group_of = {id(task): name for task, name in zip(tasks, names, strict=True)}
        live: list[tuple[Task, Need]] = []
        for task in tasks:
            run = run_of(task)
            if not task.done and (run.need is None or not run.need.waiting_for_tokens()):
                self.advance(task, [])  # start it, or ask again what it waits for
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
        wide = self._config.n_batch if len(live) == 1 else self._config.n_ubatch
        plan = step_shares(
            [need.left() for _, need in live],
            live_groups,
            self._served,
            wide,
            min(wide, SHARED_STEP_TOKENS),
            set(also_active) - set(live_groups),
        )
        tokens: list[int] = []
        pos: list[int] = []
        seqs: list[int] = []
        outputs: list[bool] = []
        # (task, its need, first entry taken, entries taken, their first batch index)
        taken: list[tuple[Task, Need, int, int, int]] = []
        for (task, need), count in zip(live, plan, strict=True):
            if count <= 0:
                continue
            start, at = need.taken, len(tokens)
            tokens += need.tokens[start : start + count]
            pos += need.pos[start : start + count]
            seqs += need.seqs[start : start + count]
            outputs += need.outputs[start : start + count]
            taken.append((task, need, start, count, at))
        if not any(outputs):
            outputs[-1] = True  # llama.cpp crashes on a batch without outputs
        rc = self._ctx.decode(tokens, pos, seqs, outputs)
        if rc == NO_ROOM and self._prefixes.drop_idle():
            rc = self._ctx.decode(tokens, pos, seqs, outputs)
        if rc == NO_ROOM:
            raise ContextFull
        if rc != DECODED:
            error = EngineError(Code.INFERENCE_ERROR, f"llama_decode returned {rc}")
            for task, *_ in taken:
                self.fail(task, error)
            return
        self.stats["steps"] += 1
        self.stats["step_tokens"] += len(tokens)
        self._served = served_after(self._served, live_groups, plan)
        self._collect(taken)

    def _collect(self, taken: list[tuple[Task, Need, int, int, int]]) -> None:
        """After a decode: each task's logits rows, and the tasks whose needs are met go
        on."""
        for _, need, start, count, at in taken:
            for j in range(count):
                if need.outputs[start + j]:
                    need.rows.append(self._ctx.logits(at + j))
            need.taken += count
            if need.taken < len(need.tokens):
                need.rows = [row.copy() for row in need.rows]  # the next decode reuses them
        for task, need, *_ in taken:
            if need.taken == len(need.tokens):
                self.advance(task, need.rows)

    def advance(self, task: Task, rows: list[Vector]) -> None:
        """Resume a task's generator with its logits rows, up to what it needs next."""
        run = run_of(task)
        assert run.gen is not None
        try:
            run.need = run.gen.send(rows) if run.need is not None else next(run.gen)
        except StopIteration as end:
            run.need = None
            task.outcome = end.value
        except Exception as exc:  # noqa: BLE001 - the job's own error; the scheduler answers
            run.need = None
            task.error = exc

    def fail(self, task: Task, error: EngineError) -> None:
        run = run_of(task)
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

    @staticmethod
    def drop(task: Task) -> None:
        """Stop a task and free its cells (its generator's cleanup runs now)."""
        run = run_of(task)
        if run.gen is not None:
            run.gen.close()
        run.need = None
        if not task.done:
            task.error = Interrupted()
