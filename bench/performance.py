"""The inference-path figures of README.md, measured side by side in one run.

    .venv/bin/python -m bench.performance            # everything (about 10 minutes on 2 cores)
    .venv/bin/python -m bench.performance --jobs 20  # fewer jobs per path

Same model (the bundled SmolLM2-135M-Instruct Q4_1), same threads (2), same machine:

1. classify job latency, p50, and accuracy on sensor messages:
   - edge-agent through MQTT (agent subprocess, a sensor on loopback);
   - the floor: the job's own tokens at llama-bench's prompt speed, plus its label tokens;
   - llama-server best practice: fixed part first, cache_prompt, a grammar over the labels;
   - naive llama-cpp-python: create_completion with the labels' grammar, the job's text
     before the instructions (so nothing is reused between jobs);
   with the default short fixed part, and with a ~300-token fixed part (instructions and
   few-shot examples).
2. constrained vs free generation tokens/s in one process (edge-agent's engine), and
   llama-cpp-python's LlamaGrammar.from_json_schema for reference.
3. agent overhead (MQTT round trip minus engine time), resident memory minus the model
   file, idle CPU.
4. a profile that learned from rows (docs/profiles.md) against label scoring of the same
   texts, p50 and p95, on both bundled models, and the memory of what was learned
   (`--learned-only` runs just this part).

llama-bench and llama-server are built from the llama.cpp vendored in the installed
llama-cpp-python's sdist (bench/llamacpp_tools.py).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import psutil

from bench.llamacpp_tools import ensure_tools
from edge_agent.adapters.broker import LocalBroker, free_port, wait_for_port
from edge_agent.adapters.engine import EngineConfig, LlamaEngine
from edge_agent.adapters.mqtt import Requester
from edge_agent.adapters.store import load_lock, locate
from edge_agent.core.constraint import JsonConstraint
from edge_agent.core.metrics import percentile
from edge_agent.core.prompt import (
    DEFAULT_CLASSIFY_INSTRUCTIONS,
    Example,
    classify_plan,
    extract_plan,
)
from edge_agent.core.schema import SchemaLimits, compile_schema
from edge_agent.core.wire import ClassifyResult
from tests.harness.process import AgentProcess, start_agent_process

ROOT = Path(__file__).resolve().parent.parent
THREADS = 2
EVERY = 10  # jobs per chunk: the floor is measured before each
LONG_INSTRUCTIONS = (
    "You watch the messages of an industrial site: pumps, freezers, boilers, batteries, "
    "doors, gas detectors and conveyors. Decide how urgent each message is. A reading "
    "inside its normal range, or a routine event, is normal. A reading drifting toward a "
    "limit, a battery running low, maintenance that is due, or a component that needs "
    "attention soon is a warning. Anything that endangers people or equipment now, a "
    "reading past an alarm limit, fire, smoke, gas, a leak, or a safety device tripping "
    "is critical. When a message mentions several things, judge it by the most urgent one."
)
LONG_EXAMPLES = [
    Example("Chiller CH-1 supply water 7.0 C, normal operation.", "normal"),
    Example("Battery of tag T-4 at 18 percent.", "warning"),
    Example("Gas detector GD-2 reads 35 percent LEL in the boiler room.", "critical"),
    Example("Door D-7 closed at 18:02 by badge 4411.", "normal"),
    Example("Filter F-3 pressure drop rising, service due in 3 days.", "warning"),
    Example("Smoke detected in warehouse aisle 4, sprinklers active.", "critical"),
]


def bundled_model() -> Path:
    entry = load_lock(ROOT / "models.lock").get("smollm2-135m-instruct-q4_1")
    assert entry is not None
    return locate(entry, Path(tempfile.gettempdir()))


def rows(limit: int) -> list[dict[str, Any]]:
    """Sensor messages rated normal / warning / critical (the long prompt's examples use
    those labels), repeated up to `limit`."""
    path = ROOT / "tests" / "data" / "eval" / "sensor_classify.jsonl"
    data = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    data = [r for r in data if r["labels"] == ["normal", "warning", "critical"]]
    return (data * (1 + limit // len(data)))[:limit]


# ---- 1. classify latency ----------------------------------------------------------------


def llama_bench_gen_speed(tool: Path, model: Path) -> float:
    out = subprocess.run(
        [str(tool), "-m", str(model), "-t", str(THREADS), "-p", "0", "-n", "64", "-r", "3", "-o", "json"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return float(json.loads(out.stdout)[0]["avg_ts"])


def job_token_counts(
    engine: LlamaEngine, plan: Any, data: list[dict[str, Any]]
) -> tuple[int, list[int]]:
    """(fixed-part tokens, each job's own tokens + the label tokens it must evaluate)."""
    fixed, _ = engine.job_tokens(plan, "x")
    counts = []
    for row in data:
        _, job = engine.job_tokens(plan, row["text"])
        label_tokens, end = engine.label_tokens(plan, row["labels"])
        counts.append(len(job) + sum(len(t) - (0 if end is not None else 1) for t in label_tokens))
    return len(fixed), counts


def floor_ms(tool: Path, model: Path, depth: int, counts: list[int]) -> list[float]:
    """The floor: each job's own tokens at llama-bench's prompt speed for a batch of that
    size at that context depth (the fixed part sits in the cache before them)."""
    size = int(statistics.median(counts))
    out = subprocess.run(
        [str(tool), "-m", str(model), "-t", str(THREADS), "-p", str(size), "-n", "0",
         "-d", str(depth), "-r", "5", "-o", "json"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    speed = float(json.loads(out.stdout)[0]["avg_ts"])
    return [n / speed * 1000 for n in counts]


class AgentSession:
    """An agent subprocess and a sensor on loopback MQTT, one job at a time."""

    def __init__(self, long: bool, labels: list[str]) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="edge-perf-"))
        self.prefix = f"p{uuid.uuid4().hex[:6]}"
        self.broker = LocalBroker(workdir=self.work / "broker").start()
        self.agent = start_agent_process(
            self.broker.url, self.prefix, self.work / "agent", log_level="info",
            env={"EDGE_AGENT_MODEL__N_THREADS": str(THREADS),
                 "EDGE_AGENT_MODEL__N_THREADS_BATCH": str(THREADS),
                 "EDGE_AGENT_TELEMETRY__INTERVAL_S": "30"},
        )  # fmt: skip
        self.client = Requester("127.0.0.1", self.broker.port, f"perf-{uuid.uuid4().hex[:6]}")
        self.client.connect()
        self.reply_topic = f"{self.prefix}/replies/perf"
        self.client.subscribe(self.reply_topic)
        self.extra: dict[str, Any] = {}
        if long:
            self.extra = {
                "instructions": LONG_INSTRUCTIONS,
                "examples": [{"text": e.text, "answer": e.answer} for e in LONG_EXAMPLES],
            }
        self.count = 0
        self.job({"text": "warm up", "labels": labels})

    def job(self, row: dict[str, Any]) -> tuple[float, str, float]:
        """(round trip ms, label, agent overhead ms: round trip minus engine time)."""
        self.count += 1
        job = {"id": f"j{self.count}", "text": row["text"], "labels": row["labels"], **self.extra}
        start = time.perf_counter()
        self.client.publish(
            f"{self.prefix}/jobs/classify",
            json.dumps(job).encode(),
            response_topic=self.reply_topic,
            qos=1,
        )
        msg = self.client.wait_for(lambda m: json.loads(m.payload).get("id") == job["id"], 60)
        elapsed = (time.perf_counter() - start) * 1000
        if msg is None:
            raise RuntimeError(f"no reply to {job['id']}")
        body = json.loads(msg.payload)
        if body["status"] != "done":
            raise RuntimeError(f"job {job['id']} answered {body['status']}: {body.get('error')}")
        t = body["timings"]
        return elapsed, body["result"]["label"], elapsed - (t["prompt_ms"] + t["gen_ms"])

    def close(self) -> None:
        self.client.close()
        self.agent.kill()
        self.broker.close()


class ServerSession:
    """llama-server with the same model, threads and prompt; fixed part first,
    cache_prompt, a grammar over the labels."""

    def __init__(self, tool: Path, model: Path, engine: LlamaEngine) -> None:
        self.engine = engine
        port = free_port()
        self.proc = subprocess.Popen(
            [str(tool), "-m", str(model), "-t", str(THREADS), "-tb", str(THREADS), "--port",
             str(port), "--host", "127.0.0.1", "-c", "2048", "-np", "1", "--no-webui"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        if not wait_for_port(port, 120):
            raise RuntimeError("llama-server did not start")
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        _wait_healthy(self.conn)
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]

    def job(self, plan: Any, row: dict[str, Any]) -> tuple[float, str]:
        labels = row["labels"]
        plan = plan or classify_plan(labels, None, [])
        grammar = "root ::= " + " | ".join(json.dumps(" " + label) for label in labels)
        body = {"prompt": self.engine.render_prompt(plan, row["text"]), "n_predict": 8,
                "temperature": 0, "cache_prompt": True, "grammar": grammar}  # fmt: skip
        for attempt in range(2):
            start = time.perf_counter()
            try:
                self.conn.request(
                    "POST", "/completion", json.dumps(body), {"Content-Type": "application/json"}
                )
                answer = str(json.loads(self.conn.getresponse().read())["content"]).strip()
            except (http.client.RemoteDisconnected, ConnectionError):
                # the server closed an idle keep-alive connection: reconnect, untimed
                self.conn.close()
                self.conn.connect()
                self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
                if attempt:
                    raise
                continue
            return (time.perf_counter() - start) * 1000, answer
        raise RuntimeError("unreachable")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _wait_healthy(conn: http.client.HTTPConnection) -> None:
    for _ in range(240):
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                return
        except (OSError, http.client.HTTPException):
            conn.close()
        time.sleep(0.5)
    raise RuntimeError("llama-server never became healthy")


def naive(model: Path, data: list[dict[str, Any]], long: bool) -> tuple[list[float], float]:
    """create_completion with a grammar, the job's text before the instructions."""
    llm = llama_cpp.Llama(
        model_path=str(model), n_ctx=2048, n_threads=THREADS, n_threads_batch=THREADS, verbose=False
    )
    latencies, right = [], 0
    for row in data:
        labels = row["labels"]
        instructions = LONG_INSTRUCTIONS if long else DEFAULT_CLASSIFY_INSTRUCTIONS
        shots = (
            "".join(f"Message: {e.text}\nLabel: {e.answer}\n" for e in LONG_EXAMPLES)
            if long
            else ""
        )
        prompt = (
            f"<|im_start|>user\nMessage: {row['text']}\n\n{instructions}\n{shots}"
            f"Labels: {', '.join(labels)}. Answer with the label only.<|im_end|>\n"
            "<|im_start|>assistant\nLabel:"
        )
        grammar = llama_cpp.LlamaGrammar.from_string(
            "root ::= " + " | ".join(json.dumps(" " + label) for label in labels), verbose=False
        )
        start = time.perf_counter()
        out = llm.create_completion(prompt, max_tokens=8, temperature=0, grammar=grammar)
        latencies.append((time.perf_counter() - start) * 1000)
        right += str(out["choices"][0]["text"]).strip() == row["label"]  # type: ignore[index]
    llm.close()
    return latencies, right / len(data)


# ---- 2. constrained generation ----------------------------------------------------------


def constrained_vs_free(model: Path, rounds: int = 5) -> tuple[float, float, float]:
    engine = LlamaEngine(model, EngineConfig(n_threads=THREADS, n_threads_batch=THREADS))
    schema = {
        "type": "object",
        "properties": {
            "notes": {
                "type": "array",
                "items": {"type": "string", "maxLength": 64},
                "minItems": 8,
                "maxItems": 8,
            }
        },
    }
    plan = extract_plan(
        compile_schema(schema, SchemaLimits()), "Write notes about the message.", []
    )
    text = "Pump P-3 vibration 9.1 mm/s, above the alarm threshold."
    # As the agent runs it: each note a piece of the text (grounded), with its confidence.
    constraint = JsonConstraint(compile_schema(schema, SchemaLimits())).bind(text)
    free, constrained = [], []
    for _ in range(rounds):
        out = engine.extract(plan, text, constraint, 256)
        constrained.append(out.timings.tokens_per_second or 0.0)
        t = engine.generate_free(plan, text, out.timings.completion_tokens)
        free.append(t.tokens_per_second or 0.0)
    engine.close()
    llm = llama_cpp.Llama(
        model_path=str(model), n_ctx=2048, n_threads=THREADS, n_threads_batch=THREADS, verbose=False
    )
    grammar = llama_cpp.LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
    start = time.perf_counter()
    out = llm.create_completion(
        "Write notes about pumps as JSON: ", max_tokens=128, temperature=0, grammar=grammar
    )
    slow = out["usage"]["completion_tokens"] / (time.perf_counter() - start)  # type: ignore[index]
    llm.close()
    return statistics.median(free), statistics.median(constrained), slow


# ---- 3. overhead, memory, idle CPU -----------------------------------------------------------


@contextlib.contextmanager
def warm_agent(
    work: Path, jobs: int = 10, env: dict[str, str] | None = None
) -> Iterator[AgentProcess]:
    """A broker and an agent with the bundled model that has answered `jobs` classify and
    `jobs` extract jobs: what the memory figures are read from (also by bench/memory.py,
    whose `--set` settings come in `env`)."""
    with LocalBroker(workdir=work / "broker") as broker:
        agent = start_agent_process(
            broker.url, f"m{uuid.uuid4().hex[:6]}", work / "agent", log_level="info", env=env
        )
        client = Requester("127.0.0.1", broker.port, "perf-mem")
        client.connect()
        client.subscribe(f"{agent.prefix}/replies/m")
        for i in range(jobs):
            client.publish(
                f"{agent.prefix}/jobs/classify",
                json.dumps(
                    {
                        "id": f"m{i}",
                        "text": "Pump P-3 vibration 9.1 mm/s",
                        "labels": ["ok", "warning", "critical"],
                    }
                ).encode(),
                response_topic=f"{agent.prefix}/replies/m",
            )
            client.publish(
                f"{agent.prefix}/jobs/extract",
                json.dumps(
                    {
                        "id": f"e{i}",
                        "text": "Sensor TS-1 reads 21.7 C",
                        "schema": {
                            "type": "object",
                            "properties": {
                                "device": {"type": "string"},
                                "value": {"type": "number"},
                            },
                        },
                    }
                ).encode(),
                response_topic=f"{agent.prefix}/replies/m",
            )
        for _ in range(2 * jobs):
            if client.wait_for(lambda m: True, 60) is None:
                agent.kill()
                raise RuntimeError(f"the agent did not answer:\n{agent.log_text()[-2000:]}")
        client.close()
        try:
            yield agent
        finally:
            agent.kill()


def memory_and_idle(model: Path, idle_s: float = 30.0) -> tuple[float, float]:
    with warm_agent(Path(tempfile.mkdtemp(prefix="edge-perf-"))) as agent:
        process = psutil.Process(agent.proc.pid)
        time.sleep(2)
        rss = process.memory_info().rss - model.stat().st_size
        before = process.cpu_times()
        time.sleep(idle_s)
        after = process.cpu_times()
        idle = ((after.user - before.user) + (after.system - before.system)) / idle_s * 100
    return rss / 2**20, idle


def p50(values: list[float]) -> float:
    return float(percentile(values, 50) or 0.0)


def accuracy(
    tools: dict[str, Path], model: Path, engine: LlamaEngine
) -> list[tuple[str, int, float, float, float]]:
    """Classify accuracy on every eval dataset: edge-agent (MQTT), llama-server, naive."""
    out = []
    server = ServerSession(tools["llama-server"], model, engine)
    try:
        for name in (
            "sensor_classify.jsonl",
            "loghub_openssh_classify.jsonl",
            "loghub_bgl_alert_classify.jsonl",
        ):
            path = ROOT / "tests" / "data" / "eval" / name
            data = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            agent = AgentSession(long=False, labels=data[0]["labels"])
            try:
                agent_right = sum(agent.job(row)[1] == row["label"] for row in data)
            finally:
                agent.close()
            server_right = sum(server.job(None, row)[1] == row["label"] for row in data)
            _, naive_acc = naive(model, data, long=False)
            out.append(
                (name, len(data), agent_right / len(data), server_right / len(data), naive_acc)
            )
    finally:
        server.close()
    return out


def latency(
    tools: dict[str, Path], model: Path, engine: LlamaEngine, data: list[dict[str, Any]], long: bool
) -> dict[str, Any]:
    """Chunks of EVERY jobs, each path in turn per chunk (floor, agent, engine alone,
    llama-server), so the machine's speed drifting during the run moves all alike."""
    plan = classify_plan(
        data[0]["labels"], LONG_INSTRUCTIONS if long else None, LONG_EXAMPLES if long else []
    )
    fixed, counts = job_token_counts(engine, plan, data)
    agent = AgentSession(long, data[0]["labels"])
    server = ServerSession(tools["llama-server"], model, engine)
    out: dict[str, list[float]] = {
        "agent": [],
        "alone": [],
        "server": [],
        "floor": [],
        "overhead": [],
    }
    ratios: list[float] = []
    try:
        server.job(plan, data[0])  # warm its cache
        engine.classify(plan, data[0]["text"], data[0]["labels"])
        for start in range(0, len(data), EVERY):
            chunk = slice(start, start + EVERY)
            floor = floor_ms(tools["llama-bench"], model, fixed, counts[chunk])
            agent_ms = []
            for row in data[chunk]:
                ms, _, overhead = agent.job(row)
                agent_ms.append(ms)
                out["overhead"].append(overhead)
            for row in data[chunk]:
                t0 = time.perf_counter()
                engine.classify(plan, row["text"], row["labels"])
                out["alone"].append((time.perf_counter() - t0) * 1000)
            out["server"].extend(server.job(plan, row)[0] for row in data[chunk])
            out["agent"].extend(agent_ms)
            out["floor"].extend(floor)
            ratios.append(p50(agent_ms) / p50(floor))
    finally:
        agent.close()
        server.close()
    naive_ms, _ = naive(model, data, long)
    return {"fixed": fixed, "tokens": statistics.median(counts), "ratio": statistics.median(ratios),
            "naive": p50(naive_ms), **{k: p50(v) for k, v in out.items()}}  # fmt: skip


def learned_vs_scoring(jobs: int) -> list[dict[str, Any]]:
    """Per model: learn the OpenSSH classify rows of four folds as a profile would; then each
    held-out row (and more, up to `jobs`) as a job of that profile (the tap and the head)
    and as a zero-shot job with the same labels (label scoring), interleaved row by row so
    drift moves both alike. Engine time, in-process (the MQTT path adds the same few ms to
    both)."""
    import shutil

    from edge_agent.core.learning import folds_for
    from edge_agent.core.protocol import Delivery, JobLimits, Profile, Topics, parse_job
    from edge_agent.service.learning import ProfileRows, learn
    from edge_agent.service.rows import file_sha256, load_rows
    from edge_agent.service.runner import JobRunner

    path = ROOT / "tests" / "data" / "eval" / "loghub_openssh_classify.jsonl"
    all_rows = load_rows(path)
    folds = folds_for([r["label"] for r in all_rows])
    train = tuple(r for r, f in zip(all_rows, folds, strict=True) if f != 0)
    held = [r for r, f in zip(all_rows, folds, strict=True) if f == 0]
    labels = tuple(all_rows[0]["labels"])
    rows = {"ssh": ProfileRows("ssh", path, file_sha256(path), "classify", train, labels)}
    profiles = {"ssh": Profile(kind="classify", labels=labels)}
    lock = load_lock(ROOT / "edge_agent" / "data" / "models.lock")
    out = []
    for name in ("smollm2-135m-instruct-q4_1", "gemma-3-270m-q4_k_m"):
        entry = lock.get(name)
        assert entry is not None
        model = locate(entry, Path.home() / ".cache" / "edge-agent-test-models")
        engine = LlamaEngine(model, EngineConfig(n_threads=THREADS, n_threads_batch=THREADS))
        cache = Path(tempfile.mkdtemp(prefix="edge-learned-"))
        t0 = time.perf_counter()
        learned = learn(rows, profiles, engine, engine.tokens, engine.facts.n_layer, name, cache)
        learn_s = time.perf_counter() - t0
        runner = JobRunner(engine, learned=learned, tokens=engine.tokens)

        def job(body: dict[str, Any]) -> Any:
            body = {"id": "b", "kind": "classify", **body}
            delivery = Delivery("t/jobs/classify", json.dumps(body).encode(), time.time())
            return parse_job(delivery, Topics("t", "t", "t"), JobLimits(), profiles)

        texts = [r["text"] for r in (held * (1 + jobs // max(1, len(held))))[: max(jobs, 1)]]
        ms: dict[str, list[float]] = {"learned": [], "scoring": []}
        right = {"learned": 0, "scoring": 0}
        truth = {r["text"]: r["label"] for r in held}
        for text in texts[:3]:  # warm both paths (their prefixes, the tap's context)
            runner.run(job({"profile": "ssh", "text": text}), lambda: False)
            runner.run(job({"text": text, "labels": list(labels)}), lambda: False)
        for text in texts:
            for path_name, body in (
                ("learned", {"profile": "ssh", "text": text}),
                ("scoring", {"text": text, "labels": list(labels)}),
            ):
                t1 = time.perf_counter()
                result = runner.run(job(body), lambda: False).result
                ms[path_name].append((time.perf_counter() - t1) * 1000)
                right[path_name] += (
                    isinstance(result, ClassifyResult) and result.label == truth[text]
                )
        report = learned["ssh"].report
        out.append(
            {
                "model": name,
                "rows": len(train),
                "held": len(texts),
                "learn_s": learn_s,
                **{f"{k}_p50": float(percentile(v, 50) or 0) for k, v in ms.items()},
                **{f"{k}_p95": float(percentile(v, 95) or 0) for k, v in ms.items()},
                **{f"{k}_right": right[k] / len(texts) for k in right},
                "head_bytes": report.bytes,
                "tap_bytes": engine.tap_bytes,
                "layer": report.extra.get("layer"),
            }
        )
        engine.close()
        shutil.rmtree(cache, ignore_errors=True)
    return out


def print_learned(jobs: int) -> None:
    print(
        "\n| model | rows learned | jobs | learned p50 / p95 | label scoring p50 / p95 "
        "| learned / scoring p50 | right: learned / scoring | learning took | head | tap context |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for r in learned_vs_scoring(jobs):
        print(
            f"| {r['model']} | {r['rows']} | {r['held']} "
            f"| {r['learned_p50']:.1f} / {r['learned_p95']:.1f} ms "
            f"| {r['scoring_p50']:.1f} / {r['scoring_p95']:.1f} ms "
            f"| {r['learned_p50'] / r['scoring_p50']:.2f} "
            f"| {r['learned_right']:.1%} / {r['scoring_right']:.1%} | {r['learn_s']:.1f} s "
            f"| {r['head_bytes'] / 1024:.0f} KiB (layer {r['layer']}) "
            f"| {r['tap_bytes'] / 2**20:.1f} MiB |",
            flush=True,
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument(
        "--learned-only", action="store_true", help="only part 4: learned profile vs scoring"
    )
    args = parser.parse_args()
    if args.learned_only:
        print_learned(args.jobs)
        return 0
    tools = ensure_tools()
    model = bundled_model()
    data = rows(args.jobs)
    engine = LlamaEngine(model, EngineConfig(n_threads=THREADS, n_threads_batch=THREADS))
    gen_speed = llama_bench_gen_speed(tools["llama-bench"], model)
    print(f"llama-bench generation: {gen_speed:.0f} tokens/s\n")
    print(
        "| fixed part | job tokens (median) | edge-agent p50, over MQTT | its engine alone p50 "
        "| floor p50 | edge-agent / floor | llama-server p50 | naive llama-cpp-python p50 "
        "| naive / edge-agent | agent overhead p50 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for long in (False, True):
        r = latency(tools, model, engine, data, long)
        print(
            f"| {r['fixed']} tokens | {r['tokens']:.0f} | {r['agent']:.1f} ms | {r['alone']:.1f} ms "
            f"| {r['floor']:.1f} ms | {r['ratio']:.2f} | {r['server']:.1f} ms | {r['naive']:.1f} ms "
            f"| {r['naive'] / r['agent']:.1f}x | {r['overhead']:.1f} ms |",
            flush=True,
        )
    if not args.skip_accuracy:
        print(
            "\n| dataset | rows | edge-agent accuracy | llama-server accuracy | naive accuracy |\n|---|---|---|---|---|"
        )
        for name, n, a, srv, nv in accuracy(tools, model, engine):
            print(f"| {name} | {n} | {a:.1%} | {srv:.1%} | {nv:.1%} |", flush=True)
    engine.close()
    free, constrained, slow = constrained_vs_free(model)
    print("\n| generation (same process) | tokens/s |\n|---|---|")
    print(f"| free (edge-agent engine, greedy) | {free:.0f} |")
    print(
        f"| constrained by a JSON Schema (edge-agent engine) | {constrained:.0f} ({constrained / free:.2f} of free) |"
    )
    print(f"| llama-cpp-python LlamaGrammar.from_json_schema | {slow:.1f} |")
    rss, idle = memory_and_idle(model)
    print(
        f"\nagent resident memory minus the model file: {rss:.0f} MiB; idle CPU: {idle:.2f}% of one core"
    )
    print_learned(args.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
