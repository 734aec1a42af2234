"""The engine's own speed in one process, without MQTT: what a change inside
edge_agent/adapters/engine/ costs or saves.

    .venv/bin/python -m bench.engine                   # SmolLM2-135M, 2 threads, 3 repeats
    .venv/bin/python -m bench.engine --repeat 5 --rows 48

For each repeat (the median is printed): classify jobs one at a time (p50 latency, with
the prefix cached as in service), extract jobs one at a time (tokens/s of the answer), and
a burst of classify jobs stepped together at `jobs.parallel` 4 (jobs/s), plus the engine's
Python time per step (the time of `step` minus llama_decode's, measured by timing the
decode calls), which is what a refactor of the logic above the context can move.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.performance import ROOT, bundled_model
from edge_agent.adapters.engine import EngineConfig, LlamaEngine
from edge_agent.core.constraint import JsonConstraint
from edge_agent.core.prompt import classify_plan, extract_plan
from edge_agent.core.schema import SchemaLimits, compile_schema

EVAL = ROOT / "tests" / "data" / "eval"


def load(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (EVAL / name).read_text().splitlines() if line.strip()]


def once(path: Path, rows: int) -> dict[str, float]:
    classify = load("sensor_classify.jsonl")
    classify = (classify * (1 + rows // len(classify)))[:rows]
    extract = load("sensor_extract.jsonl")[: max(4, rows // 4)]
    engine = LlamaEngine(path, EngineConfig(n_threads=2, n_threads_batch=2, parallel=4))
    llama = bindings()
    decode_s = [0.0]
    real_decode = llama.llama_decode

    def timed(*args: Any) -> int:
        start = time.perf_counter()
        try:
            return int(real_decode(*args))
        finally:
            decode_s[0] += time.perf_counter() - start

    llama.llama_decode = timed  # the C call every version of the engine makes
    try:
        latencies = []
        for row in classify:
            plan = classify_plan(row["labels"], None, [])
            start = time.perf_counter()
            engine.classify(plan, row["text"], row["labels"])
            latencies.append((time.perf_counter() - start) * 1000)
        tokens, seconds = 0, 0.0
        for row in extract:
            schema = {
                "type": "object",
                "properties": {k: {"type": v} for k, v in row["fields"].items()},
                "required": list(row["fields"]),
            }
            node = compile_schema(schema, SchemaLimits())
            constraint = JsonConstraint(node).bind(row["text"])
            out = engine.extract(extract_plan(node, None, []), row["text"], constraint, 64)
            tokens += out.timings.completion_tokens
            seconds += out.timings.gen_ms / 1000
        tasks = [engine.begin_classify(classify_plan(r["labels"], None, []), r["text"], r["labels"]) for r in classify]  # fmt: skip
        decode_s[0] = 0.0
        steps = engine.stats["steps"]
        start = time.perf_counter()
        running: list[Any] = []
        while tasks or running:
            while tasks and len(running) < 4:
                running.append(tasks.pop())
            engine.step(running)
            running = [t for t in running if not t.done]
        burst = time.perf_counter() - start
        n_steps = engine.stats["steps"] - steps
        return {
            "classify p50 ms": statistics.median(latencies),
            "extract tokens/s": tokens / seconds if seconds else 0.0,
            "burst jobs/s (parallel 4)": len(classify) / burst,
            "Python ms per step": (burst - decode_s[0]) * 1000 / max(1, n_steps),
        }
    finally:
        llama.llama_decode = real_decode
        engine.close()


def bindings() -> Any:
    """llama.cpp's bindings module as the engine imports it (before and after the engine
    became a package), so its decodes can be timed."""
    import importlib

    for name in ("edge_agent.adapters.engine.bindings", "edge_agent.adapters.llama_lib"):
        try:
            return importlib.import_module(name).bindings
        except ImportError:
            continue
    raise RuntimeError("no llama.cpp bindings module found")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rows", type=int, default=32, help="classify rows (extract: a quarter)")
    args = parser.parse_args()
    path = bundled_model()
    runs = [once(path, args.rows) for _ in range(args.repeat)]
    print(f"{'figure':<28}{'median':>10}   runs")
    for key in runs[0]:
        values = [r[key] for r in runs]
        shown = "  ".join(f"{v:.2f}" for v in values)
        print(f"{key:<28}{statistics.median(values):>10.2f}   {shown}")


if __name__ == "__main__":
    main()
