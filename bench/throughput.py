"""Bursts of jobs, side by side: edge-agent over MQTT against llama-server with -np N.

    .venv/bin/python -m bench.throughput                 # both models, N = 1, 4 and 8
    .venv/bin/python -m bench.throughput --models smollm2-135m-instruct-q4_1 --np 1,4 --parallel 1,4

Sensors publish in bursts (a door opens, a line stops). Each burst is published at once
(`--repeat` times per path; the median row is shown):
32 classify jobs (sensor messages rated normal / warning / critical), then 16 extract jobs
(device, metric, value, unit from sensor messages). For each path the table gives jobs per
second over the burst (first publish to last answer), the p50 and p95 of each job's own
latency (its publish to its answer) and the resident memory of the serving process minus
the model file.

- edge-agent N: the agent with `jobs.parallel` = N (N jobs share each llama_decode), MQTT 5,
  2 threads.
- llama-server (built from the llama.cpp vendored in the installed llama-cpp-python's sdist,
  bench/llamacpp_tools.py) with -np N, continuous batching (its default), the same
  threads, n_ctx 2048 per slot, one unified KV buffer (`--kv-unified`, so slots share the
  cached prompt), a full-size SWA cache (`--swa-full`: without it Gemma-3's sliding-window
  layers cannot reuse a cached prompt), and a competent client: the agent's exact prompt,
  `cache_prompt`, a grammar over the labels (classify) or `json_schema` (extract), one
  HTTP connection per concurrent request.

Issue 16's yardstick: the last lines compare the agent's best N with its N = 1 (one job
at a time, as before issue 16) and with llama-server's best -np.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.llamacpp_tools import ensure_tools
from edge_agent.adapters.broker import LocalBroker, free_port, wait_for_port
from edge_agent.adapters.engine import EngineConfig, LlamaEngine
from edge_agent.adapters.mqtt import Incoming, Requester
from edge_agent.adapters.store import load_lock, locate
from edge_agent.core.metrics import percentile
from edge_agent.core.prompt import classify_plan, extract_plan
from edge_agent.core.schema import SchemaLimits, compile_schema, schema_for_fields
from tests.harness.process import start_agent_process

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = Path.home() / ".cache" / "edge-agent-test-models"
THREADS = 2
CLASSIFY_BURST = 32
EXTRACT_BURST = 16
LABELS = ["normal", "warning", "critical"]
FIELDS = {"device": "string", "metric": "string", "value": "number", "unit": "string"}
SCHEMA = schema_for_fields(FIELDS)
MODELS = ["smollm2-135m-instruct-q4_1", "gemma-3-270m-q4_k_m"]


def sensor_texts() -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in (ROOT / "tests/data/eval/sensor_classify.jsonl").open()]
    classify = [r["text"] for r in rows if r["labels"] == LABELS] or [r["text"] for r in rows]
    extract = [
        json.loads(line)["text"] for line in (ROOT / "tests/data/eval/sensor_extract.jsonl").open()
    ]
    return (
        [classify[i % len(classify)] for i in range(CLASSIFY_BURST)],
        [extract[i % len(extract)] for i in range(EXTRACT_BURST)],
    )


@dataclass
class Burst:
    path: str
    kind: str
    jobs: int
    seconds: float
    latencies_ms: list[float]
    memory_mib: float

    def row(self) -> str:
        return (
            f"| {self.path} | {self.kind} | {self.jobs} | {self.jobs / self.seconds:.2f} | "
            f"{percentile(self.latencies_ms, 50):.0f} | {percentile(self.latencies_ms, 95):.0f} "
            f"| {self.memory_mib:.0f} |"
        )


HEADER = (
    "| path | burst | jobs | jobs/s | p50 ms | p95 ms | memory minus model, MiB |\n"
    "|---|---|---|---|---|---|---|"
)


def rss_minus(pid: int, model: Path) -> float:
    return (psutil.Process(pid).memory_info().rss - model.stat().st_size) / 2**20


class AgentPath:
    """The agent subprocess and a sensor publishing a whole burst at once."""

    def __init__(self, name: str, model: Path, parallel: int) -> None:
        self.model, self.parallel = model, parallel
        self.work = Path(tempfile.mkdtemp(prefix="edge-burst-"))
        self.prefix = f"b{uuid.uuid4().hex[:6]}"
        self.broker = LocalBroker(workdir=self.work / "broker").start()
        self.agent = start_agent_process(
            self.broker.url, self.prefix, self.work / "agent", log_level="info", timeout=180,
            env={"EDGE_AGENT_MODEL__NAME": name, "EDGE_AGENT_MODEL__DIR": str(MODEL_DIR),
                 "EDGE_AGENT_MODEL__N_THREADS": str(THREADS),
                 "EDGE_AGENT_MODEL__N_THREADS_BATCH": str(THREADS),
                 "EDGE_AGENT_JOBS__MAX_QUEUE": "64",
                 "EDGE_AGENT_JOBS__PARALLEL": str(parallel),
                 # a lone member: hand-back would only bounce the first jobs of a burst
                 "EDGE_AGENT_JOBS__HANDOFF": "false",
                 "EDGE_AGENT_TELEMETRY__INTERVAL_S": "30"},
        )  # fmt: skip
        self.answers: dict[str, float] = {}
        self.done = threading.Condition()
        self.client = Requester(
            "127.0.0.1", self.broker.port, f"burst-{uuid.uuid4().hex[:6]}", on_message=self._on
        )
        self.client.connect()
        self.reply_topic = f"{self.prefix}/replies/burst"
        self.client.subscribe(self.reply_topic)

    def _on(self, msg: Incoming) -> None:
        body = json.loads(msg.payload)
        if body.get("status") in ("done", "failed", "rejected", "expired"):
            if body["status"] != "done":
                print(f"  {body.get('id')}: {body['status']} {body.get('error')}", file=sys.stderr)
            with self.done:
                self.answers[body["id"]] = time.perf_counter()
                self.done.notify_all()

    def burst(self, kind: str, texts: list[str]) -> Burst:
        jobs = []
        for text in texts:
            job: dict[str, Any] = {"id": f"{kind}-{uuid.uuid4().hex[:8]}", "text": text}
            job.update({"labels": LABELS} if kind == "classify" else {"schema": SCHEMA})
            jobs.append(job)
        sent: dict[str, float] = {}
        start = time.perf_counter()
        for job in jobs:
            sent[job["id"]] = time.perf_counter()
            self.client.publish(
                f"{self.prefix}/jobs/{kind}",
                json.dumps(job).encode(),
                response_topic=self.reply_topic,
                qos=1,
            )
        with self.done:
            ok = self.done.wait_for(lambda: all(j["id"] in self.answers for j in jobs), 600)
        if not ok:
            raise RuntimeError(f"agent: {sum(j['id'] in self.answers for j in jobs)} answers")
        end = max(self.answers[j["id"]] for j in jobs)
        latencies = [(self.answers[i] - t) * 1000 for i, t in sent.items()]
        memory = rss_minus(self.agent.proc.pid, self.model)
        path = f"edge-agent N={self.parallel}"
        return Burst(path, kind, len(jobs), end - start, latencies, memory)

    def warm(self) -> None:
        self.burst("classify", ["warm up"])
        self.burst("extract", ["Sensor TS-1 reports temperature 21.7 C."])

    def close(self) -> None:
        self.client.close()
        self.agent.kill()
        self.broker.close()


class ServerPath:
    """llama-server -np N: the same prompts, cache_prompt, a grammar or a JSON schema."""

    def __init__(self, tool: Path, model: Path, engine: LlamaEngine, slots: int) -> None:
        self.model, self.engine, self.slots = model, engine, slots
        self.port = free_port()
        self.proc = subprocess.Popen(
            [str(tool), "-m", str(model), "-t", str(THREADS), "-tb", str(THREADS),
             "--port", str(self.port), "--host", "127.0.0.1", "-c", str(2048 * slots),
             "-np", str(slots), "--no-webui", "--swa-full", "--kv-unified"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        if not wait_for_port(self.port, 120):
            raise RuntimeError("llama-server did not start")
        self._wait_healthy()
        self.c_plan = classify_plan(LABELS, None, [])
        self.e_plan = extract_plan(compile_schema(SCHEMA, SchemaLimits()), None, [])

    def _wait_healthy(self) -> None:
        for _ in range(240):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.5)
        raise RuntimeError("llama-server never became healthy")

    def _one(self, kind: str, text: str) -> float:
        if kind == "classify":
            grammar = "root ::= " + " | ".join(json.dumps(" " + label) for label in LABELS)
            body = {"prompt": self.engine.render_prompt(self.c_plan, text), "n_predict": 8,
                    "grammar": grammar}  # fmt: skip
        else:
            body = {"prompt": self.engine.render_prompt(self.e_plan, text), "n_predict": 128,
                    "json_schema": SCHEMA}  # fmt: skip
        body.update(temperature=0, cache_prompt=True)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        start = time.perf_counter()
        conn.request("POST", "/completion", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        answer = json.loads(response.read())
        if response.status != 200 or "content" not in answer:
            raise RuntimeError(f"llama-server: {response.status} {answer}")
        conn.close()
        return (time.perf_counter() - start) * 1000

    def burst(self, kind: str, texts: list[str]) -> Burst:
        with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
            start = time.perf_counter()
            latencies = list(pool.map(lambda t: self._one(kind, t), texts))
            seconds = time.perf_counter() - start
        memory = rss_minus(self.proc.pid, self.model)
        return Burst(f"llama-server -np {self.slots}", kind, len(texts), seconds, latencies, memory)

    def warm(self) -> None:
        self._one("classify", "warm up")
        self._one("extract", "Sensor TS-1 reports temperature 21.7 C.")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def median(bursts: list[Burst]) -> Burst:
    """The burst with the median jobs/s (the lower middle one of an even count)."""
    ranked = sorted(bursts, key=lambda b: b.jobs / b.seconds)
    return ranked[(len(ranked) - 1) // 2]


def summary(rows: list[Burst]) -> str:
    """One burst kind: the agent's best N against its N = 1 and llama-server's best -np."""

    def rate(r: Burst) -> float:
        return r.jobs / r.seconds

    agents = [r for r in rows if r.path.startswith("edge-agent")]
    servers = [r for r in rows if not r.path.startswith("edge-agent")]
    ours = max(agents, key=rate)
    line = f"{rows[0].kind}: {ours.path} {rate(ours):.2f} jobs/s"
    single = next((r for r in agents if r.path.endswith("N=1")), None)
    if single is not None:
        line += f", {rate(ours) / rate(single):.2f}x N=1 ({rate(single):.2f})"
    if servers:
        best = max(servers, key=rate)
        line += f", {rate(ours) / rate(best):.2f}x {best.path} ({rate(best):.2f})"
    return line


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names")
    parser.add_argument("--np", default="1,4,8", help="llama-server -np values")
    parser.add_argument("--parallel", default="1,4,8", help="the agent's jobs.parallel values")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="bursts of each kind per path; the row shown is the one with the median jobs/s "
        "(a shared 2-core VM varies by 2x from one minute to the next)",
    )
    args = parser.parse_args()
    tools = ensure_tools()
    catalog = load_lock(ROOT / "models.lock")
    classify_texts, extract_texts = sensor_texts()
    for name in args.models.split(","):
        entry = catalog.get(name)
        if entry is None:
            parser.error(f"no model {name!r} in models.lock")
        model = locate(entry, MODEL_DIR)
        print(f"\n{name} ({model.stat().st_size / 2**20:.0f} MiB file), {THREADS} threads",
              flush=True)  # fmt: skip
        print(HEADER, flush=True)
        rows: list[Burst] = []
        for parallel in (int(n) for n in args.parallel.split(",")):
            agent = AgentPath(name, model, parallel)
            try:
                agent.warm()
                for kind, texts in (("classify", classify_texts), ("extract", extract_texts)):
                    rows.append(median([agent.burst(kind, texts) for _ in range(args.repeat)]))
                    print(rows[-1].row(), flush=True)
            finally:
                agent.close()
        engine = LlamaEngine(model, EngineConfig(n_threads=THREADS, n_threads_batch=THREADS))
        try:
            for slots in (int(n) for n in args.np.split(",") if n):
                server = ServerPath(tools["llama-server"], model, engine, slots)
                try:
                    server.warm()
                    for kind, texts in (("classify", classify_texts), ("extract", extract_texts)):
                        bursts = [server.burst(kind, texts) for _ in range(args.repeat)]
                        rows.append(median(bursts))
                        print(rows[-1].row(), flush=True)
                finally:
                    server.close()
        finally:
            engine.close()
        for kind in ("classify", "extract"):
            print(summary([r for r in rows if r.kind == kind]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
