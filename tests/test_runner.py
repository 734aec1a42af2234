"""What a job's result says: calibrated scores, raw scores, confidence, uncertain; and the
extraction's per-field confidence and grounding. An owned fake engine answers."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import pytest

from edge_agent.core.errors import Code, JobError
from edge_agent.core.inference import Classification, Timings
from edge_agent.core.protocol import Delivery, JobLimits, Topics, parse_job
from edge_agent.service.runner import JobRunner
from tests.harness.fakes import FakeEngine

TOPICS = Topics("edge", "pi-1", "g")


def leaning_second(labels: Sequence[str]) -> Classification:
    """Raw scores favour the first label; calibrated ones the second."""
    raw = {labels[0]: 0.6, labels[1]: 0.4}
    calibrated = {labels[0]: 0.35, labels[1]: 0.65}
    return Classification(labels[1], calibrated, Timings(), raw_scores=raw)


def scripted(answer: bytes | None = None, confidence: dict[str, float] | None = None) -> FakeEngine:
    return FakeEngine(classify=leaning_second, answer=answer, confidence=confidence or {})


def job(body: dict[str, Any], kind: str = "classify") -> Any:
    payload = json.dumps({"id": "j", "text": "Pump P-3 at 71 C", **body}).encode()
    return parse_job(Delivery(f"edge/jobs/{kind}", payload, time.time()), TOPICS, JobLimits())


def test_a_classify_result_carries_calibrated_and_raw_scores_and_its_confidence() -> None:
    result = JobRunner(scripted()).run(job({"labels": ["ok", "alarm"]}), lambda: False)
    assert result.result.model_dump(exclude_none=True) == {
        "label": "alarm",
        "scores": {"ok": 0.35, "alarm": 0.65},
        "raw_scores": {"ok": 0.6, "alarm": 0.4},
        "confidence": 0.65,
    }  # no `uncertain` without a threshold


@pytest.mark.parametrize(("threshold", "uncertain"), [(0.7, True), (0.6, False)])
def test_a_job_threshold_marks_an_unsure_label(threshold: float, uncertain: bool) -> None:
    body = {"labels": ["ok", "alarm"], "min_confidence": threshold}
    result = JobRunner(scripted()).run(job(body), lambda: False).result
    assert result.uncertain is uncertain


def test_the_agents_threshold_applies_unless_the_job_sets_its_own() -> None:
    runner = JobRunner(scripted(), min_confidence=0.9)
    assert runner.run(job({"labels": ["ok", "alarm"]}), lambda: False).result.uncertain
    own = job({"labels": ["ok", "alarm"], "min_confidence": 0.1})
    assert not runner.run(own, lambda: False).result.uncertain


def test_label_descriptions_go_into_the_fixed_part() -> None:
    engine = scripted()
    body = {"labels": ["ok", "alarm"], "label_descriptions": {"alarm": "act now"}}
    JobRunner(engine).run(job(body), lambda: False)
    assert "- ok\n- alarm: act now" in engine.plans[0].fixed[0].content


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"labels": ["ok"], "label_descriptions": {"other": "x"}}, Code.INVALID_LABELS),
        ({"labels": ["ok"], "label_descriptions": {"ok": ""}}, Code.INVALID_LABELS),
        ({"labels": ["ok"], "label_descriptions": {"ok": "a\nb"}}, Code.INVALID_LABELS),
        ({"labels": ["ok"], "label_descriptions": {"ok": 1}}, Code.INVALID_FIELD),
        ({"labels": ["ok"], "min_confidence": 1.5}, Code.INVALID_FIELD),
        ({"labels": ["ok"], "min_confidence": "0.7"}, Code.INVALID_FIELD),
        ({"labels": ["ok"], "min_confidence": True}, Code.INVALID_FIELD),
    ],
)
def test_bad_confidence_and_descriptions_are_rejected(body: dict[str, Any], code: Code) -> None:
    with pytest.raises(JobError) as caught:
        job(body)
    assert caught.value.code == code


def test_an_integer_threshold_is_a_number() -> None:
    assert job({"labels": ["ok"], "min_confidence": 1}).min_confidence == 1.0


SCHEMA = {
    "type": "object",
    "properties": {"device": {"type": "string"}, "temp": {"type": "number"}},
    "required": ["device", "temp"],
}


def test_an_extraction_is_grounded_and_carries_each_fields_confidence() -> None:
    engine = scripted(b'{"device": "P-3", "temp": 71}', {"device": 0.95, "temp": 0.55})
    body = {"schema": SCHEMA, "min_confidence": 0.7}
    result = JobRunner(engine).run(job(body, "extract"), lambda: False).result
    assert result.model_dump(exclude_none=True) == {
        "data": {"device": "P-3", "temp": 71},
        "confidence": {"device": 0.95, "temp": 0.55},
        "uncertain": ["temp"],
    }


def test_an_extraction_the_text_does_not_hold_cannot_be_written() -> None:
    engine = scripted(b'{"device": "P-4", "temp": 71}')
    with pytest.raises(AssertionError, match="not what the bound constraint allows"):
        JobRunner(engine).run(job({"schema": SCHEMA}, "extract"), lambda: False)
