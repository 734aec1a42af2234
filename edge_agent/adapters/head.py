"""What a profile learns from its labeled rows: a softmax head over the model's hidden state
at the answer's position (numpy), its cross-validated figures, and its calibration.

The agent reads each row's prompt as a job would (`LlamaEngine.embed`: the profile's
instructions and labels, the row's text) and fits a multinomial logistic regression (L2,
gradient descent on standardized features: a few hundred rows of 576-1152 numbers take
milliseconds) from those vectors to the rows' labels. SetFit's cheap half (Tunstall et al.
2022), without the contrastive tuning; measured on the bundled SmolLM2-135M in
docs/performance.md.

Its probabilities are calibrated on out-of-fold predictions: one temperature, the one that
makes the held-out rows' answers likeliest (Guo et al. 2017), so `confidence` keeps its
meaning. Only this module and the engine use numpy (docs/architecture.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

Matrix = npt.NDArray[np.float64]

L2 = 1e-2
STEPS = 400
RATE = 0.5
# Temperatures tried when calibrating (log-spaced, 0.05 to 20).
TEMPERATURES = tuple(float(t) for t in np.exp(np.linspace(math.log(0.05), math.log(20.0), 61)))


@dataclass(frozen=True)
class Head:
    """A fitted head: standardization, weights, and its calibration temperature."""

    labels: tuple[str, ...]
    mean: Matrix
    scale: Matrix
    weights: Matrix
    bias: Matrix
    temperature: float = 1.0
    layer: int = -1  # the model layer whose output it reads

    def logits(self, vectors: Sequence[Sequence[float]] | Matrix) -> Matrix:
        x = np.asarray(vectors, dtype=np.float64)
        out: Matrix = ((x - self.mean) / self.scale) @ self.weights + self.bias
        return out

    def predict(self, vector: Sequence[float]) -> tuple[dict[str, float], dict[str, float]]:
        """(probabilities before calibration, calibrated probabilities) for one job."""
        z = self.logits(np.asarray(vector, dtype=np.float64)[None, :])[0]
        raw, calibrated = _softmax(z), _softmax(z / self.temperature)
        return (
            dict(zip(self.labels, (float(p) for p in raw), strict=True)),
            dict(zip(self.labels, (float(p) for p in calibrated), strict=True)),
        )

    @property
    def nbytes(self) -> int:
        return int(self.mean.nbytes + self.scale.nbytes + self.weights.nbytes + self.bias.nbytes)

    def calibrated(self, temperature: float) -> Head:
        return replace(self, temperature=temperature)

    def reading(self, layer: int) -> Head:
        return replace(self, layer=layer)


def fit(
    vectors: Sequence[Sequence[float]] | Matrix, labels: Sequence[str], names: Sequence[str]
) -> Head:
    """A head that reads `vectors` as `labels` (each one of `names`)."""
    x = np.asarray(vectors, dtype=np.float64)
    index = {name: i for i, name in enumerate(names)}
    y = np.eye(len(names))[[index[label] for label in labels]]
    mean = x.mean(axis=0)
    scale = x.std(axis=0) + 1e-6
    z = (x - mean) / scale
    n, d = z.shape
    weights = np.zeros((d, len(names)))
    bias = np.zeros(len(names))
    for _ in range(STEPS):
        p = _softmax_rows(z @ weights + bias)
        grad = (p - y) / n
        weights -= RATE * (z.T @ grad + L2 * weights)
        bias -= RATE * grad.sum(axis=0)
    return Head(tuple(names), mean, scale, weights, bias)


def out_of_fold(
    vectors: Sequence[Sequence[float]] | Matrix,
    labels: Sequence[str],
    names: Sequence[str],
    folds: Sequence[int],
) -> list[npt.NDArray[np.float64]]:
    """Each row's logits from a head fitted without its fold (`folds[i]`: row i's fold;
    a row in fold -1 is never held out)."""
    x = np.asarray(vectors, dtype=np.float64)
    out: list[npt.NDArray[np.float64]] = [np.zeros(len(names))] * len(labels)
    for fold in sorted(set(folds) - {-1}):
        train = [i for i, f in enumerate(folds) if f != fold]
        held = [i for i, f in enumerate(folds) if f == fold]
        head = fit(x[train], [labels[i] for i in train], names)
        for i, row in zip(held, head.logits(x[held]), strict=True):
            out[i] = row
    return out


def cv_accuracy(
    vectors: Sequence[Sequence[float]] | Matrix,
    labels: Sequence[str],
    names: Sequence[str],
    folds: Sequence[int],
) -> float:
    """How often heads fitted without each fold read that fold's rows right."""
    logits = out_of_fold(vectors, labels, names, folds)
    scored = [i for i, f in enumerate(folds) if f != -1]
    if not scored:
        return 0.0
    right = sum(1 for i in scored if names[int(np.argmax(logits[i]))] == labels[i])
    return right / len(scored)


def temperature(logits: Sequence[npt.NDArray[np.float64]], answers: Sequence[int]) -> float:
    """The temperature that makes the held-out answers likeliest (1 when there are none)."""
    if not answers:
        return 1.0
    z = np.asarray(logits, dtype=np.float64)
    picked = np.asarray(answers)

    def nll(t: float) -> float:
        logp = np.log(_softmax_rows(z / t) + 1e-12)
        return float(-logp[np.arange(len(picked)), picked].mean())

    return min(TEMPERATURES, key=nll)


def probabilities(logits: npt.NDArray[np.float64], temperature: float) -> list[float]:
    return [float(p) for p in _softmax(logits / temperature)]


def save(head: Head, path: Path) -> None:
    """Keep a head on disk (np.savez; the caller names the file by what it was learned
    from: the model's and the rows' sha256)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.npz")
    np.savez(
        tmp,
        labels=np.asarray(head.labels, dtype=str),
        mean=head.mean,
        scale=head.scale,
        weights=head.weights,
        bias=head.bias,
        temperature=np.asarray(head.temperature),
        layer=np.asarray(head.layer),
    )
    tmp.replace(path)


def load(path: Path) -> Head | None:
    """A head kept by `save`, or None when there is none (or it cannot be read)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return Head(
                tuple(str(label) for label in data["labels"]),
                data["mean"],
                data["scale"],
                data["weights"],
                data["bias"],
                float(data["temperature"]),
                int(data["layer"]),
            )
    except (OSError, ValueError, KeyError):
        return None


def _softmax(z: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    e = np.exp(z - z.max())
    out: npt.NDArray[np.float64] = e / e.sum()
    return out


def _softmax_rows(z: Matrix) -> Matrix:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    out: Matrix = e / e.sum(axis=1, keepdims=True)
    return out
