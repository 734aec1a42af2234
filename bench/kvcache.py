"""Does a q8_0 KV cache change answers? Every eval set, both bundled models, row by row.

    .venv/bin/python -m bench.kvcache                    # ../shared/eval/*.jsonl, both models
    .venv/bin/python -m bench.kvcache --limit 20 tests/data/eval/sensor_classify.jsonl

Each dataset runs as `edge-agent eval` runs it (service/evaluation.py: two examples per
label from the tune rows, the test rows scored), one job at a time (bit-for-bit repeatable
answers), once with the KV cache in f16 (the default) and once in q8_0 (half its memory,
flash attention). The table gives, per model and dataset: the rows, the answers that
differ between the two (a label, or any extracted field), accuracy on the test rows with
its binomial standard error (classify: accuracy; extract: field accuracy), the jobs' p50
latency, and the KV cache's size.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from bench.performance import ROOT
from edge_agent.adapters.engine import EngineConfig, LlamaEngine
from edge_agent.adapters.store import load_lock, locate
from edge_agent.service.evaluation import EvalResult, evaluate
from edge_agent.service.rows import load_rows

MODELS = ("smollm2-135m-instruct-q4_1", "gemma-3-270m-q4_k_m")
DEFAULT_SETS = sorted((ROOT.parent / "shared" / "eval").glob("*.jsonl"))


def run(model: Path, kv: str, path: Path, limit: int | None) -> tuple[EvalResult, float]:
    rows = load_rows(path)
    rows = rows[:limit] if limit else rows
    config = EngineConfig(n_threads=2, n_threads_batch=2, parallel=1, kv_cache_type=kv)
    engine = LlamaEngine(model, config)
    try:
        start = time.perf_counter()
        result = evaluate(engine, rows, path.name, model.name)
        return result, time.perf_counter() - start
    finally:
        engine.close()


def figure(result: EvalResult) -> tuple[float, int]:
    """The test split's accuracy (classify) or field accuracy (extract), and its count."""
    test = result.test
    if test.classify_rows:
        return test.correct / test.classify_rows, test.classify_rows
    return (test.fields_right / test.fields_total if test.fields_total else 0.0), test.fields_total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("datasets", nargs="*", type=Path, default=DEFAULT_SETS)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--limit", type=int, default=None, help="first N rows of each set")
    args = parser.parse_args()
    lock = load_lock(ROOT / "edge_agent" / "data" / "models.lock")
    print(
        "| model | dataset | rows | answers changed | test figure f16 | q8_0 | ± 1 SE | p50 ms f16 | q8_0 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        entry = lock.get(name)
        assert entry is not None, name
        model = locate(entry, Path.home() / ".cache" / "edge-agent-test-models")
        for path in args.datasets:
            base, _ = run(model, "f16", path, args.limit)
            quant, _ = run(model, "q8_0", path, args.limit)
            changed = sum(a != b for a, b in zip(base.answers, quant.answers, strict=True))
            f16, n = figure(base)
            q8, _ = figure(quant)
            se = math.sqrt(f16 * (1 - f16) / n) if n else 0.0
            p50 = [sorted(r.latencies_ms)[len(r.latencies_ms) // 2] for r in (base, quant)]
            print(
                f"| {name} | {path.name} | {len(base.answers)} | {changed} | {f16:.3f} | "
                f"{q8:.3f} | {se:.3f} | {p50[0]:.0f} | {p50[1]:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
