"""Jobs in one batch on a real model (SmolLM2-135M, four jobs per decode): the answers
one at a time give, within rounding; a dropped job leaves the others alone; a long prompt
does not hold up short jobs. The scheduler's own rules (cancel, preemption, suspects) are
in test_worker.py.

"Within rounding": four copies of one job in one batch (the same tokens at the same
positions) already differ from each other, because each copy's sums run in another order
(its place in the batch and in the KV buffer). bench/batching.py measures both at size
(docs/performance.md, "Batching").
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from edge_agent.adapters.engine import EngineConfig, LlamaEngine
from edge_agent.core.inference import Classification, ContextFull, Extraction, Task
from edge_agent.core.prompt import classify_plan, extract_plan
from edge_agent.core.schema import SchemaLimits, compile_schema, schema_for_fields
from edge_agent.service.runner import _constraint_for

EVAL = Path(__file__).parent / "data" / "eval"
# A label probability moves by rounding alone: measured up to 0.05 (median 0.012) at four
# and eight jobs per batch, 16 rows (bench/batching.py --rows 16); copies of one job
# spread by 0.013.
TOLERANCE = 0.08
# A label may flip where two labels were nearly tied when the job ran alone.
NEAR_TIE = 0.1
PARALLEL = 4


def rows(name: str, n: int) -> list[dict[str, Any]]:
    lines = (EVAL / name).read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


@pytest.fixture(scope="module")
def batched(smollm2_path: Path) -> Iterator[LlamaEngine]:
    engine = LlamaEngine(
        smollm2_path, EngineConfig(n_threads=2, n_threads_batch=2, n_ctx=2048, parallel=PARALLEL)
    )
    yield engine
    engine.close()


def run_together(engine: LlamaEngine, tasks: Sequence[Task]) -> int:
    """Step the tasks as the scheduler does (core/slots.py): at most the engine's capacity
    at once, the next joining as one ends; the number of steps."""
    steps = 0
    waiting, running = list(tasks), []
    while waiting or running:
        while waiting and len(running) < engine.capacity:
            running.append(waiting.pop(0))
        engine.step(running)
        steps += 1
        running = [t for t in running if not t.done]
    return steps


def extract_job(text: str, fields: dict[str, str]) -> tuple[Any, Any]:
    node = compile_schema(schema_for_fields(fields), SchemaLimits())
    plan = extract_plan(node, None, [])
    return plan, _constraint_for(node).bind(text)


def margin(c: Classification) -> float:
    top = sorted(c.scores.values(), reverse=True)
    return top[0] - top[1]


def largest_change(a: Classification, b: Classification) -> float:
    return max(abs(a.scores[k] - b.scores[k]) for k in a.scores)


def test_classify_in_a_batch_matches_one_at_a_time(batched: LlamaEngine) -> None:
    jobs = rows("sensor_classify.jsonl", 8)
    plans = [classify_plan(r["labels"], None, []) for r in jobs]
    alone = [batched.classify(p, r["text"], r["labels"]) for p, r in zip(plans, jobs, strict=True)]
    tasks = [
        batched.begin_classify(p, r["text"], r["labels"]) for p, r in zip(plans, jobs, strict=True)
    ]
    run_together(batched, tasks[:PARALLEL])
    run_together(batched, tasks[PARALLEL:])
    worst = 0.0
    for one, task in zip(alone, tasks, strict=True):
        both = task.result()
        assert isinstance(both, Classification)
        if margin(one) >= NEAR_TIE:
            assert both.label == one.label, (one.scores, both.scores)
        worst = max(worst, largest_change(one, both))
    print(f"largest probability change, {PARALLEL} per batch vs alone: {worst:.3f}")
    assert worst < TOLERANCE


def test_copies_of_one_job_differ_only_by_rounding(batched: LlamaEngine) -> None:
    """The control for the test above: the same job four times in one batch."""
    row = rows("sensor_classify.jsonl", 1)[0]
    plan = classify_plan(row["labels"], None, [])
    alone = batched.classify(plan, row["text"], row["labels"])
    copies = [batched.begin_classify(plan, row["text"], row["labels"]) for _ in range(PARALLEL)]
    run_together(batched, copies)
    found = [c.result() for c in copies]
    assert all(isinstance(c, Classification) and c.label == alone.label for c in found)
    spread = max(largest_change(found[0], c) for c in found)  # type: ignore[arg-type]
    print(f"spread between {PARALLEL} copies of one job: {spread:.4f}")
    assert spread < TOLERANCE / 2


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
    # nearly all: greedy answers part at a near-tie token (bench/batching.py: 1 of 8 at 4
    # per batch, 2 of 8 at 8); which ones depends on the CPU's kernels
    assert same >= len(jobs) - 2, f"{same} of {len(jobs)} identical"


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
        if margin(one) >= NEAR_TIE:
            assert both.label == one.label
        assert largest_change(one, both) < TOLERANCE
    for one_e, task in zip(alone_e, tasks[2:], strict=True):
        both_e = task.result()
        assert isinstance(both_e, Extraction)
        # greedy answers may part at a near tie (seen: "Sensor TS-1" for "TS-1"); how
        # often is test_extract_in_a_batch_matches_one_at_a_time's business
        assert json.loads(both_e.text).keys() == json.loads(one_e.text).keys()


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
    # the dropped job's sequence is free again: the engine takes all three at once again
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


def test_a_context_too_small_for_two_moves_nothing_and_each_job_then_runs_alone(
    smollm2_path: Path,
) -> None:
    """What the scheduler's preemption relies on: when two jobs no longer fit, `step`
    raises ContextFull with nothing moved; the job left runs on, and the dropped one
    started again later, each to the answer it gives alone."""
    engine = LlamaEngine(
        smollm2_path, EngineConfig(n_threads=2, n_threads_batch=2, n_ctx=512, parallel=2)
    )
    try:
        text = " ".join(["Pump P-3 on line 4 reports vibration 9.1 mm/s at bearing B."] * 12)
        made = [extract_job(text, {"pump": "string", "line": "number"}) for _ in range(2)]
        alone = [engine.extract(p, text, k, 48) for p, k in made]
        tasks = [engine.begin_extract(p, text, k, 48) for p, k in made]
        full = False
        for _ in range(200):
            try:
                engine.step([t for t in tasks if not t.done])
            except ContextFull:
                full = True
                break
        assert full, "two long prompts should not fit 512 cells together"
        engine.drop(tasks[1])
        run_together(engine, [tasks[0]])
        again = engine.begin_extract(made[1][0], text, made[1][1], 48)
        run_together(engine, [again])
        assert [tasks[0].result().text, again.result().text] == [a.text for a in alone]  # type: ignore[union-attr]
    finally:
        engine.close()
