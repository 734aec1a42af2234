"""Learning from labeled rows (docs/profiles.md): the pure decisions, with the rows and the
held-out answers passed in.

A profile may name a file of labeled rows. The agent learns from them when it loads them:
for classify, a head over the model's hidden state where the answer begins; for extract,
the rows nearest a job's text become its examples. Before it serves, it reports how good
that is: cross-validated on folds of the rows (each row answered by what was learned
without it), per label or per field, with the share of sure answers that were right.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

FOLDS = 5
# SetFit matches fine-tuning with about 8 labeled examples a class (Tunstall et al. 2022):
# fewer than this for a label is warned about.
MIN_ROWS_PER_LABEL = 8
SURE = 0.7  # the confidence reported on: how often answers at or above it were right
# The layers a classify profile may read, as fractions of the model's depth. A probe on a
# layer part-way down often reads meaning better than one on the last layer (which is
# shaped to predict the next token): on the sensor severity rows, SmolLM2-135M's layer
# 22 of 30 is right 81% of the time, its last 59% (docs/performance.md).
LAYER_DEPTHS = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
# A shallower layer is chosen over the last only when it reads the learning rows this much
# better (held out, inner folds): smaller gains are within the noise of a few dozen rows.
LAYER_MARGIN = 0.10


def folds_for(labels: Sequence[str], folds: int = FOLDS) -> list[int]:
    """A fold for each row, stratified: every label's rows dealt out in turn, so each fold
    holds about as many of each. A label with a single row cannot be held out (its row
    gets -1: always learned from, never scored)."""
    counts = Counter(labels)
    k = max(2, min(folds, max(counts.values(), default=2)))
    seen: Counter[str] = Counter()
    offset = {label: i for i, label in enumerate(sorted(counts))}
    out: list[int] = []
    for label in labels:
        if counts[label] < 2:
            out.append(-1)
            continue
        out.append((seen[label] + offset[label]) % k)
        seen[label] += 1
    return out


def candidate_layers(n_layer: int) -> tuple[int, ...]:
    """The layers (0-based) a classify profile chooses from, the last one last."""
    last = max(0, n_layer - 1)
    return tuple(sorted({round(f * last) for f in LAYER_DEPTHS}))


def choose_layer(scores: Mapping[int, float], margin: float = LAYER_MARGIN) -> int:
    """The layer to read, from each candidate's held-out accuracy on the learning rows: the
    last (deepest) one, unless another is better by `margin` (then the best; of equals,
    the deeper)."""
    last = max(scores)
    best = max(scores, key=lambda layer: (scores[layer], layer))
    return best if scores[best] - scores[last] >= margin - 1e-9 else last


def warnings_for(declared: Sequence[str], labels: Sequence[str]) -> list[str]:
    """What the operator should know before trusting a classify profile's rows."""
    counts = Counter(labels)
    out = [f"label {name!r} never appears in the rows" for name in declared if not counts[name]]
    out += [
        f"label {name!r} has {counts[name]} row{'s' * (counts[name] != 1)}; "
        f"{MIN_ROWS_PER_LABEL} or more make a label reliable"
        for name in declared
        if 0 < counts[name] < MIN_ROWS_PER_LABEL
    ]
    return out


@dataclass(frozen=True)
class Figure:
    """How one label (or field) fared on held-out rows."""

    rows: int  # rows that have it
    scored: int  # of those, answered by what was learned without them
    right: int

    @property
    def accuracy(self) -> float | None:
        return self.right / self.scored if self.scored else None


@dataclass(frozen=True)
class Report:
    """How good what a profile learned is, before it serves."""

    kind: str
    rows: int
    method: str
    folds: int
    accuracy: float | None  # held-out answers right (classify) or fields right (extract)
    per: dict[str, Figure]  # per label (classify) or per field (extract)
    sure: int  # held-out answers at or above SURE confidence
    sure_right: float | None  # how often those were right
    warnings: tuple[str, ...] = ()
    bytes: int = 0  # memory of what was learned and the rows kept
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "rows": self.rows,
            "method": self.method,
            "folds": self.folds,
            "cv_accuracy": _round(self.accuracy),
            "per_label" if self.kind == "classify" else "per_field": {
                name: {"rows": f.rows, "cv_accuracy": _round(f.accuracy)}
                for name, f in self.per.items()
            },
            "sure_answers": self.sure,
            "sure_right": _round(self.sure_right),
            "warnings": list(self.warnings),
            "bytes": self.bytes,
            "seconds": round(self.seconds, 1),
            **self.extra,
        }

    def line(self) -> str:
        """One line for a terminal: rows, held-out accuracy, the weakest label or field."""
        acc = "-" if self.accuracy is None else f"{self.accuracy:.1%}"
        worst = min(
            ((f.accuracy, name) for name, f in self.per.items() if f.accuracy is not None),
            default=None,
        )
        tail = "" if worst is None else f"; weakest {worst[1]!r} {worst[0]:.0%}"
        return f"{self.rows} rows, {self.method}, {self.folds}-fold accuracy {acc}{tail}"


def classify_report(
    names: Sequence[str],
    labels: Sequence[str],
    held_out: Mapping[int, tuple[str, float]],
    folds: int,
    method: str,
    **kw: Any,
) -> Report:
    """The figures of a classify profile: `held_out[i]` is row i's answer and confidence
    from a head fitted without its fold."""
    per: dict[str, Figure] = {}
    for name in names:
        mine = [i for i, label in enumerate(labels) if label == name]
        scored = [i for i in mine if i in held_out]
        right = sum(1 for i in scored if held_out[i][0] == name)
        per[name] = Figure(len(mine), len(scored), right)
    scored_all = sum(f.scored for f in per.values())
    right_all = sum(f.right for f in per.values())
    sure = [i for i, (_answer, conf) in held_out.items() if conf >= SURE]
    sure_right = sum(1 for i in sure if held_out[i][0] == labels[i])
    return Report(
        kind="classify",
        rows=len(labels),
        method=method,
        folds=folds,
        accuracy=right_all / scored_all if scored_all else None,
        per=per,
        sure=len(sure),
        sure_right=sure_right / len(sure) if sure else None,
        warnings=tuple(warnings_for(names, labels)),
        **kw,
    )


def extract_report(
    fields: Sequence[str],
    held_out: Sequence[tuple[Mapping[str, Any], Mapping[str, Any], Mapping[str, float]]],
    rows: int,
    folds: int,
    method: str,
    **kw: Any,
) -> Report:
    """The figures of an extract profile: per held-out row (expected data, data found,
    confidence per field)."""
    per: dict[str, Figure] = {}
    sure: list[bool] = []
    for name in fields:
        scored = [(want, got, conf) for want, got, conf in held_out if name in want]
        right = [same_value(got.get(name), want[name]) for want, got, _ in scored]
        per[name] = Figure(rows, len(scored), sum(right))
        sure += [ok for (_w, _g, conf), ok in zip(scored, right, strict=True)
                 if conf.get(name, 1.0) >= SURE]  # fmt: skip
    scored_all = sum(f.scored for f in per.values())
    right_all = sum(f.right for f in per.values())
    return Report(
        kind="extract",
        rows=rows,
        method=method,
        folds=folds,
        accuracy=right_all / scored_all if scored_all else None,
        per=per,
        sure=len(sure),
        sure_right=sum(sure) / len(sure) if sure else None,
        **kw,
    )


def same_value(got: Any, want: Any) -> bool:
    """Whether an extracted value is the expected one (numbers compared as numbers)."""
    if isinstance(want, float) or isinstance(got, float):
        try:
            return math.isclose(float(got), float(want), abs_tol=1e-9)
        except (TypeError, ValueError):
            return False
    return bool(got == want)


def nearest(query: Counter[int], rows: Sequence[Counter[int]], k: int, skip: int = -1) -> list[int]:
    """The `k` rows most like `query` (cosine of token and token-pair counts), most alike
    first; `skip`: a row never to pick (the query's own, when cross-validating)."""
    qn = math.sqrt(sum(v * v for v in query.values())) or 1.0
    scored: list[tuple[float, int]] = []
    for i, row in enumerate(rows):
        if i == skip:
            continue
        dot = sum(v * row.get(t, 0) for t, v in query.items())
        rn = math.sqrt(sum(v * v for v in row.values())) or 1.0
        scored.append((-dot / (qn * rn), i))
    return [i for _, i in sorted(scored)[:k]]


def bag(tokens: Iterable[int]) -> Counter[int]:
    """Token and token-pair counts of a text (pairs folded into one int key)."""
    seq = list(tokens)
    out: Counter[int] = Counter(seq)
    out.update((a * 1_000_003 + b) ^ 0x5BD1E995 for a, b in itertools.pairwise(seq))
    return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
