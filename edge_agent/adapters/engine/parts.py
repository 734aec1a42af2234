"""What a task's generator works with (`Parts`: the context and the engine's
bookkeeping), and the prompt reading every job starts with."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from edge_agent.adapters.engine.config import EngineConfig
from edge_agent.adapters.engine.need import Gen, Need, Run
from edge_agent.adapters.engine.port import Context, Vector
from edge_agent.adapters.engine.prefix import PrefixSlots
from edge_agent.adapters.engine.sequences import Sequences
from edge_agent.adapters.engine.shapes import Shape, Shapes
from edge_agent.adapters.engine.vocab import Vocabulary
from edge_agent.core.errors import Code, EngineError
from edge_agent.core.inference import Timings


@dataclass
class Parts:
    """What a task's generator works with: the context and the engine's bookkeeping."""

    ctx: Context
    config: EngineConfig
    vocab: Vocabulary
    shapes: Shapes
    sequences: Sequences
    prefixes: PrefixSlots
    stats: dict[str, int] = field(default_factory=dict)


def read_prompt(parts: Parts, run: Run, shape: Shape, text: str, timings: Timings) -> Gen[Vector]:
    """The shape's prefix, then the job's own tokens; the last position's logits."""
    start = time.perf_counter()
    yield from parts.prefixes.attach(run, shape.prefix_tokens, timings, shape.keep)
    logits = yield from own_tokens(parts, run, shape, text, timings)
    timings.prompt_ms = (time.perf_counter() - start) * 1000.0
    return logits


def own_tokens(parts: Parts, run: Run, shape: Shape, text: str, timings: Timings) -> Gen[Vector]:
    """Evaluate the job's own tokens after the prefix; the last position's logits."""
    job = parts.shapes.job_tokens(shape, text)
    n_ctx = parts.ctx.n_ctx
    if run.pos + len(job) + 8 > n_ctx:
        raise EngineError(
            Code.CONTEXT_OVERFLOW,
            f"prompt needs {run.pos + len(job)} tokens; the context holds {n_ctx}",
        )
    rows = yield Need.one_run(job, run.pos, run.seq)
    run.pos += len(job)
    timings.prompt_tokens += len(job)
    return rows[-1]
