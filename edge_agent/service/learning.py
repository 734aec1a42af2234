"""Profiles that learn from labeled rows (docs/profiles.md): read and check the rows at start,
learn from them once the model is loaded, report how good that is, and answer the
profile's jobs with it.

    classify  each row's prompt (the profile's instructions and labels, the row's text) is
              read as a job's would be, and a softmax head is fitted from the model's
              hidden state where the answer begins to the row's label (adapters.head).
              A job of the profile is then one forward pass of its prompt and the head: no
              label continuations, no calibration texts.
    extract   the rows most like a job's text (token and token-pair counts of the model's
              own tokenizer: no forward pass) become the job's examples.

What was learned is kept in the state directory under a name made of the model file's
sha256, the rows file's sha256 and the method: a restart reuses it, another model or other
rows learn anew, never reuse. Before serving, the agent logs the figures
(`profile.learned`), and the device info carries them (`capabilities.profiles`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from edge_agent.adapters import head as heads
from edge_agent.adapters.settings import Settings
from edge_agent.core.errors import ConfigError, JobError
from edge_agent.core.inference import Embedding, Engine, run_alone
from edge_agent.core.learning import (
    Figure,
    Report,
    bag,
    candidate_layers,
    choose_layer,
    classify_report,
    extract_report,
    folds_for,
    nearest,
)
from edge_agent.core.prompt import Example, PromptPlan, canonical_json, classify_plan
from edge_agent.core.protocol import Profile
from edge_agent.core.schema import ObjectNode, SchemaLimits, compile_schema, problems
from edge_agent.service.rows import file_sha256, load_rows, schema_of
from edge_agent.service.runner import JobRunner

log = structlog.get_logger("edge_agent.learning")

# Bumped when the way a profile learns changes: what was kept is then learned anew.
METHOD = "head-v2"
# Examples a learned extract job gets: the rows most like its text.
NEAREST = 3
# Rows an extract profile is cross-validated on at load (each an extraction to run: about
# 1-2 s each with the bundled model on 2 cores; `edge-agent eval --learn` checks them all).
EXTRACT_CHECK_ROWS = 20
# A classify profile chooses its layer on inner folds of at most this many rows: enough
# to tell layers apart, and a few seconds of fitting on a board.
SELECT_ROWS = 300
INNER_FOLDS = 3

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ProfileRows:
    """A profile's rows file, read and checked (before the model loads)."""

    name: str
    path: Path
    sha256: str
    kind: str
    rows: tuple[dict[str, Any], ...]
    labels: tuple[str, ...] = ()  # classify
    schema: dict[str, Any] | None = None  # extract


@dataclass
class Learned:
    """What one profile learned, and how good it is."""

    name: str
    kind: str
    plan: PromptPlan | None  # classify: the prompt its rows were read with
    head: heads.Head | None
    report: Report
    schema: dict[str, Any] | None = None
    bags: list[Counter[int]] = field(default_factory=list)  # extract: each row's tokens
    examples: list[Example] = field(default_factory=list)  # extract: each row as an example

    def nearest_examples(self, tokens: Sequence[int], k: int = NEAREST) -> tuple[Example, ...]:
        """The rows most like a text (its tokens), as examples, most alike last (nearest
        the job's text in the prompt)."""
        picked = nearest(bag(tokens), self.bags, k)
        return tuple(self.examples[i] for i in reversed(picked))


def read_profile_rows(
    settings: Settings, profiles: Mapping[str, Profile]
) -> dict[str, ProfileRows]:
    """Every profile's rows file, checked: a row that does not parse, a label outside the
    profile's, a schema other than the profile's, a file whose sha256 is not the pinned
    one, too many rows: a ConfigError naming the file (and the line)."""
    out: dict[str, ProfileRows] = {}
    for name, p in settings.profiles.items():
        if p.rows is None:
            continue
        path = p.rows
        sha = file_sha256(path)
        if p.rows_sha256 is not None and sha != p.rows_sha256:
            raise ConfigError(
                f"profiles.{name}.rows {path}: its sha256 is {sha}, not the pinned "
                f"{p.rows_sha256} (profiles.{name}.rows_sha256)"
            )
        rows = load_rows(path)
        if len(rows) > settings.jobs.max_learned_rows:
            raise ConfigError(
                f"profiles.{name}.rows {path}: {len(rows)} rows, more than "
                f"jobs.max_learned_rows ({settings.jobs.max_learned_rows})"
            )
        profile = profiles[name]
        for row in rows:
            if row["_kind"] != p.kind:
                raise ConfigError(
                    f"{path}:{row['_line']}: a {row['_kind']} row in a {p.kind} profile"
                )
        if p.kind == "classify":
            labels = tuple(profile.labels or rows[0]["labels"])
            for row in rows:
                if row["label"] not in labels:
                    raise ConfigError(
                        f"{path}:{row['_line']}: label {row['label']!r} is not one of the "
                        f"profile's ({', '.join(labels)})"
                    )
            out[name] = ProfileRows(name, path, sha, p.kind, tuple(rows), labels=labels)
        else:
            schema = profile.schema or schema_of(rows[0])
            node = _node(schema)
            for row in rows:
                if schema_of(row) != schema:
                    raise ConfigError(
                        f"{path}:{row['_line']}: its fields or schema differ from the "
                        f"profile's schema"
                    )
                broken = problems(row["expected"], node)
                if broken:  # it would teach jobs answers their schema refuses
                    raise ConfigError(f"{path}:{row['_line']}: `expected`: {broken[0]}")
            out[name] = ProfileRows(name, path, sha, p.kind, tuple(rows), schema=schema)
    return out


def with_rows(
    profiles: Mapping[str, Profile], rows: Mapping[str, ProfileRows]
) -> dict[str, Profile]:
    """The profiles as jobs see them: a classify profile with rows has the rows' labels;
    one with rows takes its examples from them (the learned path), not from its config."""
    out = dict(profiles)
    for name, r in rows.items():
        p = profiles[name]
        if r.kind == "classify":
            out[name] = replace(p, labels=r.labels, examples=())
        else:
            out[name] = replace(p, schema=r.schema, examples=())
    return out


def learn(
    rows: Mapping[str, ProfileRows],
    profiles: Mapping[str, Profile],
    engine: Engine,
    tokens: Callable[[str], list[int]],
    n_layer: int,
    model_sha256: str,
    cache: Path,
    progress: Progress = lambda _name, _done, _total: None,
) -> dict[str, Learned]:
    """Learn every profile's rows with the loaded model (or take what was kept for this
    model and these rows)."""
    out: dict[str, Learned] = {}
    for name, r in rows.items():
        start = time.monotonic()
        profile = profiles[name]
        if r.kind == "classify":
            learned = _learn_classify(r, profile, engine, n_layer, model_sha256, cache, progress)
        else:
            learned = _learn_extract(r, profile, engine, tokens, model_sha256, cache, progress)
        if learned.report.seconds == 0.0:
            learned.report = replace(learned.report, seconds=time.monotonic() - start)
        out[name] = learned
        log.info("profile.learned", profile=name, **learned.report.to_dict())
        for warning in learned.report.warnings:
            log.warning("profile.rows_warning", profile=name, warning=warning)
    return out


def embed_all(
    engine: Engine,
    plan: PromptPlan,
    texts: Sequence[str],
    layers: Sequence[int],
    progress: Callable[[int], None] = lambda _n: None,
) -> dict[int, list[Sequence[float]]]:
    """Every text's outputs of `layers` under `plan` (the tap reads one at a time)."""
    out: dict[int, list[Sequence[float]]] = {layer: [] for layer in layers}
    for n, text in enumerate(texts, start=1):
        found = run_alone(engine, engine.begin_embed(plan, text, layers), lambda: False)
        assert isinstance(found, Embedding)
        for layer in layers:
            out[layer].append(found.layers[layer])
        progress(n)
    return out


def plan_of(profile: Profile, labels: Sequence[str]) -> PromptPlan:
    """The prompt a learned classify profile's rows and jobs are read with."""
    return classify_plan(labels, profile.instructions, (), profile.label_descriptions)


def fit_head(
    by_layer: Mapping[int, Sequence[Sequence[float]]],
    labels: Sequence[str],
    names: Sequence[str],
) -> tuple[heads.Head, dict[int, float]]:
    """A head over the layer that reads these rows best (`core.learning.choose_layer`, on
    inner folds of at most SELECT_ROWS of them), and each candidate's inner accuracy."""
    picked = _sample(labels, SELECT_ROWS)
    sub = [labels[i] for i in picked]
    inner = folds_for(sub, INNER_FOLDS)
    scores = {
        layer: heads.cv_accuracy([vectors[i] for i in picked], sub, names, inner)
        for layer, vectors in by_layer.items()
    }
    layer = choose_layer(scores)
    return heads.fit(by_layer[layer], labels, names).reading(layer), scores


def cross_validate(
    by_layer: Mapping[int, Sequence[Sequence[float]]],
    labels: Sequence[str],
    names: Sequence[str],
    folds: Sequence[int],
) -> tuple[list[Any], list[int]]:
    """Each row's logits from a head learned (layer chosen too) without its fold, and the
    layer each fold chose. Rows in fold -1 are always learned from."""
    n = len(labels)
    logits: list[Any] = [None] * n
    chosen: list[int] = []
    for fold in sorted(set(folds) - {-1}):
        train = [i for i, f in enumerate(folds) if f != fold]
        held = [i for i, f in enumerate(folds) if f == fold]
        head, _ = fit_head(
            {layer: [v[i] for i in train] for layer, v in by_layer.items()},
            [labels[i] for i in train],
            names,
        )
        chosen.append(head.layer)
        rows = head.logits([by_layer[head.layer][i] for i in held])
        for i, row in zip(held, rows, strict=True):
            logits[i] = row
    return logits, chosen


def calibrated_head(
    by_layer: Mapping[int, Sequence[Sequence[float]]],
    labels: Sequence[str],
    names: Sequence[str],
    folds: Sequence[int],
) -> tuple[heads.Head, dict[int, tuple[str, float]], dict[int, float], list[int]]:
    """Learn a classify head from rows: (the head, its temperature fitted on held-out
    folds; each held-out row's answer and calibrated confidence; each candidate layer's
    inner accuracy; the layer each fold chose)."""
    logits, chosen = cross_validate(by_layer, labels, names, folds)
    scored = [i for i, f in enumerate(folds) if f != -1]
    index = {name: j for j, name in enumerate(names)}
    temperature = heads.temperature([logits[i] for i in scored], [index[labels[i]] for i in scored])
    held: dict[int, tuple[str, float]] = {}
    for i in scored:
        probs = heads.probabilities(logits[i], temperature)
        best = max(range(len(probs)), key=probs.__getitem__)
        held[i] = (names[best], probs[best])
    head, scores = fit_head(by_layer, labels, names)
    return head.calibrated(temperature), held, scores, chosen


def _sample(labels: Sequence[str], most: int) -> list[int]:
    """At most about `most` row indexes, evenly spread over each label's rows, every label
    keeping its share (and at least 2 rows); all of them when there are no more."""
    if len(labels) <= most:
        return list(range(len(labels)))
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    out: list[int] = []
    for rows in by_label.values():
        take = min(len(rows), max(2, round(most * len(rows) / len(labels))))
        out += [rows[(j * len(rows)) // take] for j in range(take)]
    return sorted(out)


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join((METHOD, *parts)).encode()).hexdigest()[:24]


def _learn_classify(
    r: ProfileRows,
    profile: Profile,
    engine: Engine,
    n_layer: int,
    model_sha256: str,
    cache: Path,
    progress: Progress,
) -> Learned:
    plan = plan_of(profile, r.labels)
    key = _key(model_sha256, r.sha256, plan.key)
    kept_head = heads.load(cache / f"{r.name}-{key}.npz")
    kept_report = _load_report(cache / f"{r.name}-{key}.json")
    if kept_head is not None and kept_report is not None:
        log.info("profile.reused", profile=r.name, learned=key)
        return Learned(r.name, "classify", plan, kept_head, kept_report)
    texts = [row["text"] for row in r.rows]
    labels = [row["label"] for row in r.rows]
    for row in r.rows:  # a row a job could not be is the rows file's fault: name its line
        try:
            engine.fits(plan, row["text"], embed=True)
        except JobError as exc:
            raise ConfigError(f"{r.path}:{row['_line']}: {exc.message}") from exc
    layers = candidate_layers(n_layer)
    by_layer = embed_all(
        engine, plan, texts, layers, progress=lambda n: progress(r.name, n, len(texts))
    )
    folds = folds_for(labels)
    head, held, scores, chosen = calibrated_head(by_layer, labels, r.labels, folds)
    report = classify_report(
        r.labels, labels, held, max(folds) + 1, "head", bytes=head.nbytes,
        extra={
            "temperature": round(head.temperature, 3),
            "layer": head.layer,
            "layers": n_layer,
            "layer_accuracy": {str(k): round(v, 4) for k, v in scores.items()},
            "fold_layers": chosen,
        },
    )  # fmt: skip
    heads.save(head, cache / f"{r.name}-{key}.npz")
    _save_report(report, cache / f"{r.name}-{key}.json")
    return Learned(r.name, "classify", plan, head, report)


def _learn_extract(
    r: ProfileRows,
    profile: Profile,
    engine: Engine,
    tokens: Callable[[str], list[int]],
    model_sha256: str,
    cache: Path,
    progress: Progress,
) -> Learned:
    assert r.schema is not None
    node = _node(r.schema)
    bags = [bag(tokens(row["text"])) for row in r.rows]
    examples = [Example(text=row["text"], answer=canonical_json(row["expected"])) for row in r.rows]
    learned = Learned(
        r.name, "extract", None, None, _empty_report(len(r.rows)), r.schema, bags, examples
    )
    learned.report = replace(learned.report, bytes=_extract_bytes(learned))
    key = _key(model_sha256, r.sha256, canonical_json(r.schema), profile.instructions or "")
    kept = _load_report(cache / f"{r.name}-{key}.json")
    if kept is not None:
        learned.report = kept
        return learned
    runner = JobRunner(engine)
    check = list(range(min(EXTRACT_CHECK_ROWS, len(r.rows))))
    held: list[tuple[dict[str, Any], dict[str, Any], dict[str, float]]] = []
    for n, i in enumerate(check):
        picked = nearest(bags[i], bags, NEAREST, skip=i)
        shots = tuple(examples[j] for j in reversed(picked))
        task = runner.begin_extract_with(
            node, r.rows[i]["text"], profile.instructions, shots, once=True
        )
        try:
            found = run_alone(engine, task, lambda: False)
        except JobError:
            continue
        outcome = runner.extraction_result(node, found)
        held.append((r.rows[i]["expected"], outcome.data, outcome.confidence))
        progress(r.name, n + 1, len(check))
    fields = list(r.rows[0]["expected"])
    report = extract_report(
        fields, held, len(r.rows), len(check), "nearest rows as examples",
        bytes=_extract_bytes(learned),
        extra={"examples_per_job": NEAREST, "checked_rows": len(held)},
    )  # fmt: skip
    _save_report(report, cache / f"{r.name}-{key}.json")
    learned.report = report
    return learned


def _node(schema: dict[str, Any]) -> ObjectNode:
    try:
        return compile_schema(schema, SchemaLimits(max_string_chars=100_000, max_items=1000))
    except JobError as exc:
        raise ConfigError(f"a rows file's schema: {exc.message}") from exc


def _empty_report(rows: int) -> Report:
    return Report("extract", rows, "nearest rows as examples", 0, None, {}, 0, None)


def _extract_bytes(learned: Learned) -> int:
    text = sum(len(e.text.encode()) + len(e.answer.encode()) for e in learned.examples)
    return text + sum(len(b) * 16 for b in learned.bags)


def _save_report(report: Report, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {**report.to_dict(), "_per": {k: vars(v) for k, v in report.per.items()}}
    path.write_text(json.dumps(body))


def _load_report(path: Path) -> Report | None:
    try:
        body = json.loads(path.read_text())
        per = {k: Figure(**v) for k, v in body.pop("_per").items()}
        return Report(
            kind=body["kind"], rows=body["rows"], method=body["method"], folds=body["folds"],
            accuracy=body["cv_accuracy"], per=per, sure=body["sure_answers"],
            sure_right=body["sure_right"], warnings=tuple(body["warnings"]),
            bytes=body["bytes"], seconds=body["seconds"],
        )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None
