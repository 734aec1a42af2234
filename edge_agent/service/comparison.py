"""`edge-agent eval --learn` / `--profile NAME`: three ways to answer a profile's jobs,
compared side by side on the same held-out folds of labeled rows.

    zero-shot   the job as it comes: the labels scored (classify) or the schema filled
                (extract), no examples
    examples    fixed few-shot examples: the first `examples` rows per label (classify) or
                per job (extract) of the other folds, as an operator would write them into
                a profile
    learned     what a profile learns from the other folds' rows (service/learning.py):
                a head over the model's state where the answer begins, calibrated on
                folds inside the learning rows (classify); the learning rows nearest the
                job as its examples (extract)

Rows are grouped by shape (one label set, or one schema: what one profile holds); each
group is dealt into stratified folds (core.learning.folds_for) and every row is answered
by each method with its own fold held out. Figures: accuracy (per field, for extract), how
many answers were at or above the confidence threshold and how often those were right,
and latency p50/p95 of one job alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_agent.core.errors import JobError
from edge_agent.core.inference import Engine, run_alone
from edge_agent.core.learning import SURE, bag, candidate_layers, folds_for, nearest, same_value
from edge_agent.core.metrics import percentile
from edge_agent.core.prompt import Example, canonical_json
from edge_agent.core.protocol import Delivery, JobLimits, Profile, Topics, parse_job
from edge_agent.core.wire import ClassifyResult, ExtractResult
from edge_agent.service.learning import NEAREST, calibrated_head, embed_all, plan_of
from edge_agent.service.rows import schema_of
from edge_agent.service.runner import JobRunner

METHODS = ("zero-shot", "examples", "learned")
_TOPICS = Topics("eval", "eval", "eval")
_LIMITS = JobLimits(max_prompt_chars=1_000_000, max_text_chars=1_000_000)

Progress = Callable[[str, int, int], None]


@dataclass
class MethodScore:
    """One method's figures on one group of rows."""

    scored: int = 0  # answers (classify) or fields (extract)
    right: int = 0
    judged: list[tuple[float, bool]] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    failed: int = 0  # rows the method could not answer (an error: counted wrong)

    @property
    def accuracy(self) -> float | None:
        return self.right / self.scored if self.scored else None

    def sure(self, threshold: float = SURE) -> tuple[int, float | None]:
        picked = [ok for conf, ok in self.judged if conf >= threshold]
        return len(picked), (sum(picked) / len(picked) if picked else None)

    def to_dict(self, threshold: float = SURE) -> dict[str, Any]:
        n, right = self.sure(threshold)
        return {
            "scored": self.scored,
            "accuracy": _round(self.accuracy),
            "at_or_above": {"threshold": threshold, "answers": n, "right": _round(right)},
            "latency_ms_p50": _round(percentile(self.latencies_ms, 50), 1),
            "latency_ms_p95": _round(percentile(self.latencies_ms, 95), 1),
            "failed": self.failed,
        }


@dataclass
class Comparison:
    """The three methods on one group of rows (one shape)."""

    dataset: str
    model: str
    kind: str
    shape: str  # the labels, or the schema's fields
    rows: int
    folds: int
    methods: dict[str, MethodScore] = field(
        default_factory=lambda: {m: MethodScore() for m in METHODS}
    )
    layers: list[int] = field(default_factory=list)  # classify: the layer each fold chose

    def to_dict(self, threshold: float = SURE) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "model": self.model,
            "kind": self.kind,
            "shape": self.shape,
            "rows": self.rows,
            "folds": self.folds,
            **{name: s.to_dict(threshold) for name, s in self.methods.items()},
            "learned_layers": self.layers,
        }


def groups(rows: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Rows by shape (label set or schema), in the order the shapes first appear."""
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        key = (
            canonical_json(row["labels"])
            if row["_kind"] == "classify"
            else canonical_json(schema_of(row))
        )
        out.setdefault(f"{row['_kind']}:{key}", []).append(row)
    return list(out.values())


def compare(
    engine: Engine,
    tokens: Callable[[str], list[int]],
    n_layer: int,
    rows: Sequence[dict[str, Any]],
    dataset: str,
    model: str,
    *,
    profile: Profile | None = None,
    examples: int = 2,
    progress: Progress = lambda _what, _done, _total: None,
) -> list[Comparison]:
    """Every group of `rows` answered by the three methods on the same held-out folds.
    `profile`: the instructions (and label descriptions) every method's jobs carry."""
    engine.reset()
    out = []
    for group in groups(rows):
        if group[0]["_kind"] == "classify":
            out.append(
                _classify(engine, n_layer, group, dataset, model, profile, examples, progress)
            )
        else:
            out.append(_extract(engine, tokens, group, dataset, model, profile, examples, progress))
    return out


def _classify(
    engine: Engine,
    n_layer: int,
    rows: Sequence[dict[str, Any]],
    dataset: str,
    model: str,
    profile: Profile | None,
    examples: int,
    progress: Progress,
) -> Comparison:
    names = tuple(rows[0]["labels"])
    labels = [row["label"] for row in rows]
    folds = folds_for(labels)
    k = max(folds) + 1
    result = Comparison(dataset, model, "classify", ", ".join(names), len(rows), k)
    runner = JobRunner(engine)
    instructions = profile.instructions if profile else None
    described = dict(profile.label_descriptions) if profile else {}
    total = len(rows)
    # zero-shot and fixed examples: each row as a job
    for name in ("zero-shot", "examples"):
        score = result.methods[name]
        for done, i in enumerate(_by_fold(folds), start=1):
            row = rows[i]
            shots: list[dict[str, Any]] = []
            if name == "examples":
                train = [r for j, r in enumerate(rows) if folds[j] != folds[i]]
                for label in names:
                    same = [r for r in train if r["label"] == label][:examples]
                    shots += [{"text": r["text"], "answer": label} for r in same]
            body: dict[str, Any] = {"kind": "classify", "labels": list(names)}
            if instructions:
                body["instructions"] = instructions
            if described:
                body["label_descriptions"] = described
            _answer(runner, row, body, shots, score)
            progress(f"{name} {dataset}", done, total)
    # learned: the candidate layers read once per row (the time of one job counts one
    # layer: what a profile's job reads), then per fold a head learned without it, its
    # layer chosen and its temperature fitted on the other folds only
    plan = plan_of(profile or Profile(kind="classify"), names)
    score = result.methods["learned"]
    layers = candidate_layers(n_layer)
    by_layer: dict[int, list[Sequence[float]]] = {layer: [] for layer in layers}
    for done, row in enumerate(rows, start=1):
        for layer, got in embed_all(engine, plan, [row["text"]], layers).items():
            by_layer[layer] += got
        start = time.perf_counter()
        embed_all(engine, plan, [row["text"]], (layers[-1],))
        score.latencies_ms.append((time.perf_counter() - start) * 1000)
        progress(f"learned {dataset}", done, total)
    for fold in range(k):
        learn_from = [j for j, f in enumerate(folds) if f != fold]
        held = [j for j, f in enumerate(folds) if f == fold]
        train_labels = [labels[j] for j in learn_from]
        head, _held, _scores, _chosen = calibrated_head(
            {layer: [v[j] for j in learn_from] for layer, v in by_layer.items()},
            train_labels,
            names,
            folds_for(train_labels),
        )
        result.layers.append(head.layer)
        for j in held:
            _raw, probs = head.predict(by_layer[head.layer][j])
            answer = max(probs, key=probs.__getitem__)
            right = answer == labels[j]
            score.scored += 1
            score.right += right
            score.judged.append((probs[answer], right))
    return result


def _by_fold(folds: Sequence[int]) -> list[int]:
    """The rows that are held out, fold by fold (a fold's jobs share their examples: one
    prompt shape at a time, as a profile's jobs are)."""
    return sorted((i for i, f in enumerate(folds) if f != -1), key=lambda i: (folds[i], i))


def _extract(
    engine: Engine,
    tokens: Callable[[str], list[int]],
    rows: Sequence[dict[str, Any]],
    dataset: str,
    model: str,
    profile: Profile | None,
    examples: int,
    progress: Progress,
) -> Comparison:
    schema = schema_of(rows[0])
    k = max(2, min(5, len(rows)))
    folds = [i % k for i in range(len(rows))] if len(rows) > 1 else [-1]
    shape = ", ".join(rows[0]["expected"])
    result = Comparison(dataset, model, "extract", shape, len(rows), k)
    runner = JobRunner(engine)
    instructions = profile.instructions if profile else None
    bags = [bag(tokens(row["text"])) for row in rows]
    total = len(rows)
    for name in METHODS:
        score = result.methods[name]
        for done, i in enumerate(_by_fold(folds), start=1):
            row = rows[i]
            train = [j for j, f in enumerate(folds) if f != folds[i]]
            picked: list[int] = []
            if name == "examples":
                picked = train[:examples]
            elif name == "learned":
                near = nearest(bags[i], [bags[j] for j in train], NEAREST)
                picked = [train[j] for j in reversed(near)]
            shots = [{"text": rows[j]["text"], "answer": rows[j]["expected"]} for j in picked]
            body: dict[str, Any] = {"kind": "extract", "schema": schema}
            if instructions:
                body["instructions"] = instructions
            _answer(runner, row, body, shots, score, once=name == "learned")
            progress(f"{name} {dataset}", done, total)
    return result


def _answer(
    runner: JobRunner,
    row: dict[str, Any],
    body: dict[str, Any],
    shots: list[dict[str, Any]],
    score: MethodScore,
    once: bool = False,
) -> None:
    """Run the row as a job with these examples; score its answer. `once`: examples chosen
    for this job alone, run as a learned extract profile's job is (PromptPlan.once)."""
    full = {"id": "eval", "text": row["text"], **body}
    if shots and not once:
        full["examples"] = shots
    delivery = Delivery(f"eval/jobs/{body['kind']}", json.dumps(full).encode(), time.time())
    start = time.perf_counter()
    found: ClassifyResult | ExtractResult | None
    try:
        job = parse_job(delivery, _TOPICS, _LIMITS)
        if once:
            assert job.node is not None
            shown = tuple(Example(s["text"], canonical_json(s["answer"])) for s in shots)
            task = runner.begin_extract_with(job.node, job.text, job.instructions, shown, once=True)
            found = runner.extraction_result(
                job.node, run_alone(runner.engine, task, lambda: False)
            )
        else:
            found = runner.run(job, lambda: False).result
    except JobError:
        found = None
    score.latencies_ms.append((time.perf_counter() - start) * 1000)
    if row["_kind"] == "classify":
        score.scored += 1
        if found is None:
            score.failed += 1
            return
        assert isinstance(found, ClassifyResult)
        right = found.label == row["label"]
        score.right += right
        score.judged.append((found.confidence, right))
        return
    expected = row["expected"]
    score.scored += len(expected)
    if found is None:
        score.failed += 1
        return
    assert isinstance(found, ExtractResult)
    for name, value in expected.items():
        right = same_value(found.data.get(name), value)
        score.right += right
        if name in found.confidence:
            score.judged.append((found.confidence[name], right))


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)
