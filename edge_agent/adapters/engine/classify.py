"""Classification: every label scored as the continuation of the prompt, then corrected
for the prompt's own bias (contextual calibration, Zhao et al., "Calibrate Before Use",
2021). Labels are scored, not sampled: the prompt is evaluated once and every label that
needs more than its first token is evaluated in its own KV sequence, sharing the prompt's
cells, all in one batch.
"""

from __future__ import annotations

import math
import time

import numpy as np
import numpy.typing as npt

from edge_agent.adapters.engine.need import Gen, Need, Run
from edge_agent.adapters.engine.parts import Parts, own_tokens
from edge_agent.adapters.engine.port import Vector
from edge_agent.adapters.engine.shapes import Shape
from edge_agent.core.inference import Classification, Timings
from edge_agent.core.prompt import PromptPlan


def classify(
    parts: Parts, run: Run, plan: PromptPlan, text: str, labels: tuple[str, ...]
) -> Gen[Classification]:
    """Both sets of probabilities (raw and calibrated) sum to 1; the label is the best
    calibrated one."""
    timings = Timings()
    shape = parts.shapes.get(plan)
    parts.sequences.take(run)
    try:
        start = time.perf_counter()
        yield from parts.prefixes.attach(run, shape.prefix_tokens, timings, shape.keep)
        bias = yield from label_bias(parts, run, shape, labels)
        logits = yield from own_tokens(parts, run, shape, text, timings)
        timings.prompt_ms = (time.perf_counter() - start) * 1000.0
        start = time.perf_counter()
        logprobs = yield from score_labels(parts, run, shape, labels, logits)
        timings.gen_ms = (time.perf_counter() - start) * 1000.0
    finally:
        parts.sequences.release(run)
    raw = normalise(logprobs)
    scores = normalise({label: lp - bias[label] for label, lp in logprobs.items()})
    top = max(scores, key=scores.__getitem__)
    return Classification(
        label=top, scores=scores, timings=timings, logprobs=logprobs, raw_scores=raw
    )


def label_bias(
    parts: Parts, run: Run, shape: Shape, labels: tuple[str, ...]
) -> Gen[dict[str, float]]:
    """log p_cf(label): the label distribution this prompt gives texts that say nothing,
    averaged over `config.calibration_texts`. Measured on the first job of a shape and
    label set, in that job's own sequence (rewound to the prefix after each text), then
    kept with the shape."""
    known = parts.shapes.known_bias(shape, labels)
    if known is not None:
        return known
    texts = parts.config.calibration_texts
    if not texts:
        return dict.fromkeys(labels, 0.0)
    mean = dict.fromkeys(labels, 0.0)
    prefix = run.pos
    for text in texts:
        logits = yield from own_tokens(parts, run, shape, text, Timings())
        scored = yield from score_labels(parts, run, shape, labels, logits)
        for label, p in normalise(scored).items():
            mean[label] += p / len(texts)
        parts.ctx.seq_remove(run.seq, prefix, -1)
        run.pos = prefix
    bias = {label: math.log(max(p, 1e-12)) for label, p in mean.items()}
    parts.shapes.keep_bias(shape, labels, bias)
    return bias


def score_labels(
    parts: Parts, run: Run, shape: Shape, labels: tuple[str, ...], first_logits: Vector
) -> Gen[dict[str, float]]:
    """Log-probability of each label's tokens as the continuation of the prompt.

    Labels that need more than their first token are evaluated together in one batch
    (a round per `label_sequences` of them), each in its own KV sequence sharing the
    prompt's cells. When one label's tokens are
    a prefix of another's, every label also scores the end-of-turn token, so "high" and
    "high_temp" compare fairly.
    """
    label_tokens, with_end = parts.shapes.label_tokens(shape, labels)
    turn_end = parts.shapes.turn_end
    first = log_softmax(first_logits)  # before any wait: the row is only lent
    logps = [float(first[tokens[0]]) for tokens in label_tokens]
    todo: list[tuple[int, list[int], list[int]]] = []
    for i, tokens in enumerate(label_tokens):
        inputs = tokens if with_end else tokens[:-1]
        if inputs:
            targets = [*tokens[1:], turn_end] if with_end else tokens[1:]
            todo.append((i, inputs, targets))
    if not todo:
        return dict(zip(labels, logps, strict=True))
    # In rounds of at most `label_sequences` labels: each round is one batch, each label
    # in its own sequence sharing the prompt's cells. Few sequences keep llama.cpp's
    # logits buffer small (it holds a row of n_vocab floats per sequence: 1 MiB each for
    # Gemma's 262K vocabulary); most label sets need one round.
    width = parts.sequences.label_count
    for start in range(0, len(todo), width):
        round_ = todo[start : start + width]
        seqs = yield from parts.sequences.take_labels(len(round_))
        try:
            need = Need()
            targets_by_row: list[tuple[int, int]] = []
            for (i, inputs, targets), seq in zip(round_, seqs, strict=True):
                parts.ctx.seq_copy(run.seq, seq)
                for j, token in enumerate(inputs):
                    targets_by_row.append((i, targets[j]))
                    need.add(token, run.pos + j, seq, True)
            rows = yield need
            for (i, target), row in zip(targets_by_row, rows, strict=True):
                logps[i] += float(log_softmax(row)[target])
        finally:
            parts.sequences.release_labels(seqs)
    return dict(zip(labels, logps, strict=True))


def normalise(logprobs: dict[str, float]) -> dict[str, float]:
    """Probabilities (summing to 1) from log-scores."""
    best = max(logprobs.values())
    weights = {label: math.exp(lp - best) for label, lp in logprobs.items()}
    total = sum(weights.values())
    return {label: w / total for label, w in weights.items()}


def log_softmax(logits: Vector) -> npt.NDArray[np.float64]:
    x = logits.astype(np.float64)
    peak = float(x.max())
    out: npt.NDArray[np.float64] = x - (peak + math.log(float(np.exp(x - peak).sum())))
    return out
