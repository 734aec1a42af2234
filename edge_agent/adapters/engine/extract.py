"""Extraction: greedy decoding under `constraint.JsonConstraint` (hence the schema).

Each step takes the most likely token and checks its bytes against the automaton; only
when it is rejected are the next candidates checked, best first. Bytes the schema forces
(keys, punctuation) are evaluated with the next step's token, never sampled. Each field's
confidence is the product of its choices' probabilities among the likeliest tokens the
constraint accepted there.
"""

from __future__ import annotations

import math
import time

import numpy as np

from edge_agent.adapters.engine.need import Gen, Need, Run
from edge_agent.adapters.engine.parts import Parts, read_prompt
from edge_agent.adapters.engine.port import Vector
from edge_agent.adapters.engine.vocab import Vocabulary
from edge_agent.core.constraint import JsonConstraint, State
from edge_agent.core.errors import Code, EngineError
from edge_agent.core.inference import Extraction, Timings
from edge_agent.core.prompt import PromptPlan

# How many of the likeliest tokens normalise a choice's probability (field confidence).
CONFIDENCE_TOP = 4


def extract(
    parts: Parts,
    run: Run,
    plan: PromptPlan,
    text: str,
    constraint: JsonConstraint,
    max_tokens: int,
) -> Gen[Extraction]:
    timings = Timings()
    shape = parts.shapes.get(plan)
    parts.sequences.take(run)
    try:
        logits = yield from read_prompt(parts, run, shape, text, timings)
        start = time.perf_counter()
        logps: dict[str, float] = {}
        out, truncated = yield from constrained(
            parts, run, constraint, logits, max_tokens, timings, logps
        )
        timings.gen_ms = (time.perf_counter() - start) * 1000.0
    finally:
        parts.sequences.release(run)
    return Extraction(
        text=out.decode("utf-8"),
        timings=timings,
        truncated=truncated,
        confidence={f: math.exp(lp) for f, lp in logps.items()},
    )


def constrained(
    parts: Parts,
    run: Run,
    constraint: JsonConstraint,
    logits: Vector,
    max_tokens: int,
    timings: Timings,
    confidence: dict[str, float] | None = None,
) -> Gen[tuple[bytes, bool]]:
    """The answer's bytes and whether the token budget (or the context) cut it short; a
    cut answer is closed as quickly as the schema allows."""
    vocab = parts.vocab
    n_ctx = parts.ctx.n_ctx
    state = constraint.initial()
    out = bytearray()
    pending: list[int] = []  # tokens chosen or forced, not yet evaluated
    emitted = 0  # every token of the answer, sampled or forced
    chosen = 0  # tokens the model picked (the budget counts these)
    budget = min(max_tokens, n_ctx - run.pos - 2)
    truncated = False
    fields = confidence if confidence is not None else {}
    while True:
        forced, state = constraint.forced(state)
        if forced:
            out += forced
            tokens = vocab.tokens_for(forced)
            pending.extend(tokens)
            emitted += len(tokens)
        if constraint.is_complete(state):
            break
        if run.pos + len(pending) + 1 >= n_ctx:
            budget = chosen  # out of context: close the JSON now
        elif pending:
            rows = yield Need.one_run(pending, run.pos, run.seq)
            logits = rows[-1]
            run.pos += len(pending)
            pending = []
        if chosen >= budget:
            truncated = True
            out += finish(constraint, state)
            break
        field = constraint.field_at(state)
        constraint.limit_work(len(out))  # a step past it raises cost_exceeded
        token, next_state = choose(vocab, constraint, state, logits)
        if field is not None:
            fields[field] = fields.get(field, 0.0) + choice_logprob(
                vocab, constraint, state, logits, token
            )
        state = next_state
        chosen += 1
        emitted += 1
        out += vocab.pieces[token]
        pending.append(token)
    timings.completion_tokens = emitted
    return bytes(out), truncated


def choose(
    vocab: Vocabulary, constraint: JsonConstraint, state: State, logits: Vector
) -> tuple[int, State]:
    """The most likely token the constraint accepts.

    When none of the likeliest candidates fits (rare: e.g. a string at its length cap
    whose likely tokens are all long), the token spelling the byte the automaton needs
    to finish is taken.
    """
    best = int(np.argmax(logits))
    fitted = fits(vocab, constraint, state, best)
    if fitted is not None:
        return best, fitted
    n_vocab = len(vocab.pieces)
    # tiny vocabularies (synthetic test models): look at every token
    for width in (min(64, n_vocab - 1), min(1024, n_vocab - 1)):
        top = np.argpartition(-logits, width)[:width]
        ordered = top[np.argsort(-logits[top])]
        for token in ordered.tolist():
            fitted = fits(vocab, constraint, state, token)
            if fitted is not None:
                return int(token), fitted
    byte = constraint.finish_byte(state)
    token = vocab.byte_tokens.get(byte) if byte is not None else None
    fitted = fits(vocab, constraint, state, token) if token is not None else None
    if token is None or fitted is None:
        raise EngineError(Code.INTERNAL_ERROR, "no token can continue the JSON")
    return token, fitted


def choice_logprob(
    vocab: Vocabulary, constraint: JsonConstraint, state: State, logits: Vector, token: int
) -> float:
    """log p(token), normalised over the likeliest tokens the constraint accepts here
    (the top CONFIDENCE_TOP): how sure the model was of this choice among the ones it
    could make. Forced bytes are certain and never come here."""
    top = np.argpartition(-logits, CONFIDENCE_TOP)[:CONFIDENCE_TOP]
    candidates = {int(t) for t in top.tolist()} | {token}
    allowed = [t for t in candidates if t == token or fits(vocab, constraint, state, t)]
    values = np.array([float(logits[t]) for t in allowed], dtype=np.float64)
    peak = float(values.max())
    total = float(np.exp(values - peak).sum())
    return float(logits[token]) - peak - math.log(total)


def fits(vocab: Vocabulary, constraint: JsonConstraint, state: State, token: int) -> State | None:
    piece = vocab.pieces[token]
    if not piece:
        return None
    return constraint.feed(state, piece)


def finish(constraint: JsonConstraint, state: State) -> bytes:
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
