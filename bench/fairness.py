"""Fair shares, measured: a careful sensor's latency alone and beside each greedy requester
of issue 21, side by side (tests/test_starvation.py runs the short version).

    PYTHONPATH=. .venv/bin/python -m bench.fairness                 # 50 probes a shape
    PYTHONPATH=. .venv/bin/python -m bench.fairness --probes 20
    EDGE_AGENT_TREE=/path/to/old/checkout PYTHONPATH=. .venv/bin/python -m bench.fairness

One agent (the bundled model, 4 jobs at once) on its own Mosquitto. The sensor sends one
classify job at a time on the device topic and times each answer; each greedy requester
keeps its jobs outstanding for the whole measurement, sending the next as soon as one is
answered (after retry_after_ms, when it is told one):
    slow      4 extractions of a text that repeats one word 600 times, 25 string fields
    priority  14 classify jobs at priority 9 (the sensor's are 5)
    shapes    4 classify jobs that each bring a label set never seen
EDGE_AGENT_TREE runs another checkout's agent (figures before a change).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from edge_agent.adapters.broker import LocalBroker
from tests.harness.fairness import (
    Flood,
    Prober,
    busy_classify,
    new_labels,
    slow_extract,
    wait_idle,
)
from tests.harness.process import start_agent_process

SHAPES = {
    "slow": (slow_extract, 4, 5),
    "priority": (busy_classify, 14, 9),
    "shapes": (new_labels, 4, 5),
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--probes", type=int, default=50, help="sensor jobs per row")
    parser.add_argument("--only", metavar="NAMES", help="comma-separated: slow, priority, shapes")
    args = parser.parse_args()
    wanted = args.only.split(",") if args.only else list(SHAPES)
    work = Path(tempfile.mkdtemp(prefix="edge-fair-"))
    with LocalBroker(workdir=work / "broker") as broker:
        agent = start_agent_process(
            broker.url, "fair", work / "agent", env={"EDGE_AGENT_JOBS__PARALLEL": "4"}
        )
        probe = Prober(broker.port, "fair", agent.device_id)
        try:
            probe.run(3)
            quiet = probe.run(args.probes)
            print(
                "| the sensor's jobs | p50 ms | p95 ms | p95 / quiet | answers | greedy one got |"
            )
            print("|---|---|---|---|---|---|")
            print(f"| alone | {quiet.p50 * 1000:.0f} | {quiet.p95 * 1000:.0f} | 1.0 | "
                  f"{dict(quiet.statuses)} | - |", flush=True)  # fmt: skip
            for name in wanted:
                shape, outstanding, priority = SHAPES[name]
                wait_idle(broker.port, "fair", agent.device_id)
                with Flood(
                    broker.port, "fair", agent.device_id, shape, outstanding, priority=priority
                ) as flood:
                    loaded = probe.run(args.probes, timeout=120)
                ratio = loaded.p95 / quiet.p95 if quiet.p95 else float("nan")
                print(
                    f"| beside {name} | {loaded.p50 * 1000:.0f} | {loaded.p95 * 1000:.0f} | "
                    f"{ratio:.1f} | {dict(loaded.statuses)} | {dict(flood.statuses)} "
                    f"{dict(flood.codes)} |",
                    flush=True,
                )
        finally:
            probe.close()
            agent.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
