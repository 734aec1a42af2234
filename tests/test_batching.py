"""Two jobs in one batch on a real model (SmolLM2-135M): the same answers as one at a
time, a dropped job leaves the other alone, and a long prompt does not hold up short
jobs. The scheduler's own rules (cancel, preemption, suspects) are in test_worker.py.

Two, not more: with three or more jobs' prompt chunks in one decode, label
log-probabilities moved by up to 0.33 (SmolLM2, 8 sensor rows; labels unchanged), which is
not yet explained (docs/performance.md, "Batching"); `jobs.parallel` stays 1 by default.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from edge_agent.adapters.engine import EngineConfig, LlamaEngine
from edge_agent.core.inference import Classification, Extraction, Task
from edge_agent.core.prompt import classify_plan, extract_plan
from edge_agent.core.schema import SchemaLimits, compile_schema, schema_for_fields
from edge_agent.service.runner import _constraint_for

EVAL = Path(__file__).parent / "data" / "eval"
# Two jobs in a batch gave exactly the scores they get alone (measured: 0.0).
TOLERANCE = 1e-6


def rows(name: str, n: int) -> list[dict[str, Any]]:
    lines = (EVAL / name).read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


@pytest.fixture(scope="module")
def batched(smollm2_path: Path) -> Iterator[LlamaEngine]:
    engine = LlamaEngine(
        smollm2_path, EngineConfig(n_threads=2, n_threads_batch=2, n_ctx=2048, parallel=2)
    )
    yield engine
    engine.close()


def run_together(engine: LlamaEngine, tasks: Sequence[Task]) -> int:
    """Step every task until all are done; the number of steps."""
    steps = 0
    while not all(t.done for t in tasks):
        engine.step([t for t in tasks if not t.done])
        steps += 1
    return steps


def extract_job(text: str, fields: dict[str, str]) -> tuple[Any, Any]:
    node = compile_schema(schema_for_fields(fields), SchemaLimits())
    plan = extract_plan(node, None, [])
    return plan, _constraint_for(node).bind(text)


def test_classify_in_a_batch_matches_one_at_a_time(batched: LlamaEngine) -> None:
    jobs = rows("sensor_classify.jsonl", 8)
    plans = [classify_plan(r["labels"], None, []) for r in jobs]
    alone = [batched.classify(p, r["text"], r["labels"]) for p, r in zip(plans, jobs, strict=True)]
    tasks = [
        batched.begin_classify(p, r["text"], r["labels"]) for p, r in zip(plans, jobs, strict=True)
    ]
    run_together(batched, tasks)
    worst = 0.0
    for one, task in zip(alone, tasks, strict=True):
        both = task.result()
        assert isinstance(both, Classification)
        assert both.label == one.label
        for label, p in one.scores.items():
            worst = max(worst, abs(both.scores[label] - p))
    print(f"largest probability difference, batch of 2 vs alone: {worst:.2e}")
    assert worst < TOLERANCE


def test_extract_in_a_batch_matches_one_at_a_time(batched: LlamaEngine) -> None:
    jobs = rows("sensor_extract.jsonl", 8)
    made = [extract_job(r["text"], r["fields"]) for r in jobs]
    alone = [
        batched.extract(plan, r["text"], c, 96) for (plan, c), r in zip(made, jobs, strict=True)
    ]
    tasks = [
        batched.begin_extract(plan, r["text"], c, 96)
        for (plan, c), r in zip(made, jobs, strict=True)
    ]
    run_together(batched, tasks)
    same = 0
    for one, task in zip(alone, tasks, strict=True):
        both = task.result()
        assert isinstance(both, Extraction)
        json.loads(both.text)
        if both.text == one.text:
            same += 1
        else:
            print(f"differs: alone {one.text} batched {both.text}")
    assert same >= len(jobs) - 1, f"{same} of {len(jobs)} identical"


@pytest.mark.xfail(
    reason="issue 16: shapes taking turns in the prefix slot moved scores beyond 0.005 in "
    "the full suite (passes alone); unexplained, so jobs.parallel defaults to 1",
    strict=False,
)
def test_mixed_shapes_in_one_batch(batched: LlamaEngine) -> None:
    c = rows("sensor_classify.jsonl", 2)
    e = rows("sensor_extract.jsonl", 2)
    cplan = classify_plan(c[0]["labels"], "Rate the message.", [])
    made = [extract_job(r["text"], r["fields"]) for r in e]
    alone_c = [batched.classify(cplan, r["text"], r["labels"]) for r in c]
    alone_e = [batched.extract(p, r["text"], k, 96) for (p, k), r in zip(made, e, strict=True)]
    tasks = [batched.begin_classify(cplan, r["text"], r["labels"]) for r in c]
    tasks += [batched.begin_extract(p, r["text"], k, 96) for (p, k), r in zip(made, e, strict=True)]
    run_together(batched, tasks)
    for one, task in zip(alone_c, tasks[:2], strict=True):
        both = task.result()
        assert isinstance(both, Classification)
        assert both.label == one.label
        # the two shapes take turns in the one prefix slot: their cells sit elsewhere in
        # the KV buffer than when alone (seen: 1.3e-3)
        assert max(abs(both.scores[k] - v) for k, v in one.scores.items()) < 0.005
    for one_e, task in zip(alone_e, tasks[2:], strict=True):
        both_e = task.result()
        assert isinstance(both_e, Extraction)
        assert both_e.text == one_e.text


def test_a_dropped_job_leaves_the_others_alone(batched: LlamaEngine) -> None:
    jobs = rows("sensor_extract.jsonl", 3)
    made = [extract_job(r["text"], r["fields"]) for r in jobs]
    alone = [batched.extract(p, r["text"], k, 96) for (p, k), r in zip(made, jobs, strict=True)]
    tasks = [
        batched.begin_extract(p, r["text"], k, 96) for (p, k), r in zip(made, jobs, strict=True)
    ]
    for _ in range(4):  # into generation
        batched.step(tasks)
    batched.drop(tasks[1])
    run_together(batched, [tasks[0], tasks[2]])
    assert tasks[1].error is not None
    for i in (0, 2):
        found = tasks[i].result()
        assert isinstance(found, Extraction)
        assert found.text == alone[i].text
    # the dropped job's sequence is free again: the engine still takes 2 jobs at once
    again = [
        batched.begin_extract(p, r["text"], k, 96) for (p, k), r in zip(made, jobs, strict=True)
    ]
    run_together(batched, again)
    assert [t.result().text for t in again] == [a.text for a in alone]  # type: ignore[union-attr]


def test_a_long_prompt_does_not_hold_up_short_jobs(batched: LlamaEngine) -> None:
    long_text = " ".join(["Line 4 stopped at station 7 after a jam in the feeder."] * 40)
    node_plan, constraint = extract_job(long_text, {"line": "string", "station": "number"})
    short = rows("sensor_classify.jsonl", 2)
    plan = classify_plan(short[0]["labels"], None, [])
    for r in short:  # the shape's prefix and calibration are ready, as in a running agent
        batched.classify(plan, r["text"], r["labels"])
    long_task = batched.begin_extract(node_plan, long_text, constraint, 32)
    tasks = [long_task] + [batched.begin_classify(plan, r["text"], r["labels"]) for r in short]
    steps = 0
    done_at: dict[int, int] = {}
    while not all(t.done for t in tasks):
        batched.step([t for t in tasks if not t.done])
        steps += 1
        for i, t in enumerate(tasks):
            if t.done and i not in done_at:
                done_at[i] = steps
    print(f"steps to finish: {done_at}")
    # the long job takes the first free sequence and the short ones the other, in turn;
    # each short job needs two steps (its prompt, its labels)
    assert done_at[1] <= 2
    assert done_at[2] <= 4 < done_at[0]
