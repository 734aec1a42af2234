"""A lone job's latency, side by side: this tree's agent against another revision's, and
with one job at a time against batching on, jobs taking turns so machine drift hits all.

    .venv/bin/python -m bench.lone                       # this tree: parallel 1 and 4
    .venv/bin/python -m bench.lone --against 85c3b6a     # and the agent at that revision
    .venv/bin/python -m bench.lone --jobs 200

One Mosquitto, one agent per variant (the bundled SmolLM2-135M-Instruct Q4_1, 2 threads),
one sensor. Each round sends one classify job (a sensor message, labels normal / warning /
critical) to each agent in turn and waits for its reply before the next, so every job
runs alone. Printed: each variant's p50 and p95 round trip (publish to reply), and its
p50 as a ratio of the first variant's. Issue 16 asks that a lone job stays within 1.05x
of the single-job agent that came before the scheduler.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.performance import rows
from edge_agent.adapters.broker import LocalBroker
from edge_agent.adapters.mqtt import Requester
from edge_agent.core.metrics import percentile
from tests.harness.process import AgentProcess, start_agent_process

ROOT = Path(__file__).resolve().parent.parent
THREADS = 2


def worktree(rev: str, into: Path) -> Path:
    """A checkout of `rev` beside this one (git worktree, removed at the end)."""
    path = into / f"tree-{rev[:12]}"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(path), rev],
        check=True,
        capture_output=True,
    )
    return path


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=100, help="jobs per variant")
    parser.add_argument("--against", metavar="REV", help="also run the agent at this revision")
    parser.add_argument("--parallel", default="1,4", help="this tree's jobs.parallel values")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edge-lone-"))
    trees: list[Path] = []
    variants: list[tuple[str, Path, dict[str, str]]] = []
    if args.against:
        trees.append(worktree(args.against, work))
        variants.append((f"agent at {args.against}", trees[-1], {}))
    for n in args.parallel.split(","):
        variants.append((f"this tree, jobs.parallel {n}", ROOT, {"EDGE_AGENT_JOBS__PARALLEL": n}))
    prefix = f"l{uuid.uuid4().hex[:6]}"
    broker = LocalBroker(workdir=work / "broker").start()
    agents: list[AgentProcess] = []
    client = Requester("127.0.0.1", broker.port, f"lone-{uuid.uuid4().hex[:6]}")
    try:
        for i, (_, tree, env) in enumerate(variants):
            agents.append(
                start_agent_process(
                    broker.url,
                    prefix,
                    work / f"agent{i}",
                    log_level="info",
                    cwd=tree,
                    env={
                        **env,
                        "EDGE_AGENT_MODEL__N_THREADS": str(THREADS),
                        "EDGE_AGENT_MODEL__N_THREADS_BATCH": str(THREADS),
                        "EDGE_AGENT_TELEMETRY__INTERVAL_S": "30",
                        "PYTHONPATH": str(tree),
                    },
                )
            )
        client.connect()
        reply_topic = f"{prefix}/replies/lone"
        client.subscribe(reply_topic)
        data = rows(args.jobs + 1)
        times: list[list[float]] = [[] for _ in agents]
        for n, row in enumerate(data):
            for i, agent in enumerate(agents):
                ms = one_job(client, agent, reply_topic, row, f"j{n}-{i}")
                if n:  # the first round warms each agent's prefix
                    times[i].append(ms)
            if n and n % 20 == 0:
                print(f"{n} of {args.jobs} rounds", file=sys.stderr, flush=True)
        base = percentile(times[0], 50) or 1.0
        print("| agent | jobs | p50 ms | p95 ms | p50 / first |\n|---|---|---|---|---|")
        for (name, _, _), ms in zip(variants, times, strict=True):
            p50, p95 = percentile(ms, 50) or 0.0, percentile(ms, 95) or 0.0
            print(f"| {name} | {len(ms)} | {p50:.1f} | {p95:.1f} | {p50 / base:.3f} |")
    finally:
        client.close()
        for agent in agents:
            agent.kill()
        broker.close()
        for tree in trees:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                check=False,
                capture_output=True,
            )
        shutil.rmtree(work, ignore_errors=True)
    return 0


def one_job(
    client: Requester, agent: AgentProcess, reply_topic: str, row: dict[str, Any], job_id: str
) -> float:
    job = {"id": job_id, "text": row["text"], "labels": row["labels"]}
    start = time.perf_counter()
    client.publish(
        f"{agent.prefix}/devices/{agent.device_id}/jobs/classify",
        json.dumps(job).encode(),
        response_topic=reply_topic,
        qos=1,
    )
    msg = client.wait_for(lambda m: json.loads(m.payload).get("id") == job_id, 60)
    elapsed = (time.perf_counter() - start) * 1000
    if msg is None:
        raise RuntimeError(f"no reply to {job_id}")
    body = json.loads(msg.payload)
    if body["status"] != "done":
        raise RuntimeError(f"{job_id}: {body['status']} {body.get('error')}")
    return elapsed


if __name__ == "__main__":
    sys.exit(main())
