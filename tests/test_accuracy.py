"""Answers worth acting on, on the real bundled models: contextual calibration of label
scores, extraction grounded in the job's text, per-field confidence, and a short held-out
version of `edge-agent eval` (the full run is `edge-agent eval tests/data/eval/*.jsonl`)."""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any

import pytest

from edge_agent.adapters.engine import LlamaEngine
from edge_agent.core.protocol import Delivery, JobLimits, Topics, parse_job
from edge_agent.core.schema import schema_for_fields
from edge_agent.service.evaluation import above, evaluate
from edge_agent.service.rows import load_rows
from edge_agent.service.runner import JobRunner
from tests.harness.clients import EVAL_DIR, eval_rows

pytestmark = pytest.mark.model

LEVELS = ["normal", "warning", "critical"]


@pytest.fixture(scope="module", params=["smollm2", "gemma"])
def engine(request: pytest.FixtureRequest) -> LlamaEngine:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


def job(body: dict[str, Any]) -> Any:
    body = {"id": "t", **body}
    delivery = Delivery(f"t/jobs/{body['kind']}", json.dumps(body).encode(), time.time())
    return parse_job(delivery, Topics("t", "t", "t"), JobLimits())


def run(engine: LlamaEngine, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """The job's `result` as the reply sends it."""
    found = JobRunner(engine, **kw).run(job(body), lambda: False).result
    return found.model_dump(mode="json", exclude_none=True)


def test_calibrated_scores_divide_out_the_content_free_answer(engine: LlamaEngine) -> None:
    """Independent of the engine's cache: p_cal(label) ∝ p(label | text) / mean over the
    content-free texts of p(label | content-free text), each read through classify()."""
    from edge_agent.core.prompt import classify_plan

    plan = classify_plan(LEVELS, None, [])
    free = [engine.classify(plan, t, LEVELS).raw_scores for t in engine.config.calibration_texts]
    assert all(f is not None for f in free)
    mean = {label: sum(f[label] for f in free if f) / len(free) for label in LEVELS}
    found = engine.classify(plan, "Chiller CH-1 supply water 7.0 C, normal operation.", LEVELS)
    assert found.raw_scores is not None
    weights = {label: found.raw_scores[label] / mean[label] for label in LEVELS}
    total = sum(weights.values())
    for label in LEVELS:
        assert found.scores[label] == pytest.approx(weights[label] / total, abs=0.02), label
    assert math.isclose(sum(found.scores.values()), 1.0, abs_tol=1e-9)
    assert math.isclose(sum(found.raw_scores.values()), 1.0, abs_tol=1e-9)


@pytest.mark.parametrize(
    ("dataset", "row", "raw_wrong"),
    [
        # rows where the bundled model's raw scores pick the prompt's favourite label
        ("sensor_classify.jsonl", 0, "warning"),
        ("loghub_openssh_classify.jsonl", 1, "break_in_attempt"),
    ],
)
def test_calibration_corrects_the_prompts_favourite_label(
    smollm2: LlamaEngine, dataset: str, row: int, raw_wrong: str
) -> None:
    data = eval_rows(dataset)[row]
    result = run(smollm2, {"kind": "classify", "text": data["text"], "labels": data["labels"]})
    raw = result["raw_scores"]
    assert max(raw, key=raw.__getitem__) == raw_wrong, raw
    assert result["label"] == data["label"], result
    assert result["confidence"] == result["scores"][data["label"]]


def test_label_descriptions_reach_the_model(smollm2: LlamaEngine) -> None:
    # Descriptions are part of the fixed part: they change what the model sees and scores.
    # (Made-up labels told apart only by descriptions are beyond a 135M model: "kx: about
    # water" vs "qz: about fire" moves "kx" on a flood from 0.25 to 0.36, not past 0.5.)
    labels = ["kx", "qz"]
    descriptions = {"kx": "the message is about water", "qz": "the message is about fire"}
    body = {"kind": "classify", "text": "Pipe burst, the basement is flooded.", "labels": labels}
    plain = run(smollm2, body)
    described = run(smollm2, {**body, "label_descriptions": descriptions})
    assert described["scores"]["kx"] > plain["scores"]["kx"] + 0.05, (plain, described)


def test_min_confidence_marks_answers_uncertain(smollm2: LlamaEngine) -> None:
    body = {"kind": "classify", "text": "Door D-1 opened at night.", "labels": ["ok", "alarm"]}
    assert "uncertain" not in run(smollm2, body)
    never = run(smollm2, {**body, "min_confidence": 1.0})
    assert never["uncertain"] is True
    always = run(smollm2, {**body, "min_confidence": 0.0})
    assert always["uncertain"] is False
    # the agent's default applies when the job sets none, and the job's own wins
    assert run(smollm2, body, min_confidence=1.0)["uncertain"] is True
    assert run(smollm2, {**body, "min_confidence": 0.0}, min_confidence=1.0)["uncertain"] is False


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _numbers_in(text: str) -> set[float]:
    return {float(n) for n in _NUMBER.findall(text.replace(",", ""))}


@pytest.mark.parametrize("dataset", ["sensor_extract.jsonl", "loghub_openssh_extract.jsonl"])
def test_extracted_values_are_pieces_of_the_text(engine: LlamaEngine, dataset: str) -> None:
    for data in eval_rows(dataset)[:6]:
        schema = data.get("schema") or schema_for_fields(data["fields"])
        result = run(engine, {"kind": "extract", "text": data["text"], "schema": schema})
        for name, value in result["data"].items():
            if isinstance(value, str):
                assert value and value in data["text"], (name, value, data["text"])
            elif isinstance(value, int | float):
                assert float(value) in _numbers_in(data["text"]), (name, value, data["text"])
        assert set(result["confidence"]) <= set(result["data"]), result
        assert all(0.0 < p <= 1.0 for p in result["confidence"].values()), result


def test_a_field_with_grounding_off_may_write_new_text(smollm2: LlamaEngine) -> None:
    text = "Sensor TS-7 reports humidity 48.5 % in the server room."
    schema = {
        "type": "object",
        "properties": {"verdict": {"type": "string", "enum": ["fine", "bad"]}},
        "required": ["verdict"],
    }
    # an enum is never grounded: "fine" is not in the text
    assert run(smollm2, {"kind": "extract", "text": text, "schema": schema})["data"]["verdict"] in (
        "fine",
        "bad",
    )
    free = {
        "type": "object",
        "properties": {"note": {"type": "string", "maxLength": 40, "x-grounded": False}},
        "required": ["note"],
    }
    grounded = {
        "type": "object",
        "properties": {"note": {"type": "string", "maxLength": 40}},
        "required": ["note"],
    }
    body = {"kind": "extract", "text": "Reading: 12"}
    # grounded, the only word-span answers are "Reading:", "Reading: 12" and "12"
    assert run(smollm2, {**body, "schema": grounded})["data"]["note"] in (
        "Reading:",
        "Reading: 12",
        "12",
        "Reading",
    )
    note = run(smollm2, {**body, "schema": free})["data"]["note"]
    assert isinstance(note, str) and len(note) <= 40


def test_held_out_rows_short_run(smollm2: LlamaEngine) -> None:
    """The short version of `edge-agent eval` on the sensor sets: rows never used as
    examples, two examples per label or shape from the tune rows. Full figures:
    docs/performance.md (classify 75% and fields 0.88 on these two sets)."""
    # the sets' first 30 and 10 rows, as they were before issue 22 added rows to learn from
    # (a slice keeps the tune/test split: it goes by position)
    classify = evaluate(smollm2, load_rows(EVAL_DIR / "sensor_classify.jsonl")[:30], "s", "m")
    extract = evaluate(smollm2, load_rows(EVAL_DIR / "sensor_extract.jsonl")[:10], "s", "m")
    assert classify.test.classify_rows == 20 and extract.test.extract_rows == 6
    # Floors with room for the CPU's kernels: 20 rows, measured 12-14 right on two hosts
    # (a row is 5 points; near ties flip between kernels), 25 of 26 fields. evaluate()
    # resets the engine, so what the shared fixture ran before no longer counts.
    assert classify.test.accuracy is not None and classify.test.accuracy >= 0.5
    assert extract.test.field_accuracy is not None and extract.test.field_accuracy >= 0.75
    assert extract.test.validity == 1.0
    # answers the model is sure of are right more often than those it is not
    sure, right_sure = above(classify.judged, 0.7)
    unsure = [right for conf, right in classify.judged if conf < 0.7]
    assert sure and unsure and right_sure is not None
    assert right_sure > sum(unsure) / len(unsure)
