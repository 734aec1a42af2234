"""The command line: --help everywhere, submit against a running agent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.adapters.broker import LocalBroker
from tests.harness.clients import AgentFactory

COMMANDS = ["run", "submit", "demo", "config", "probe", "select", "models", "bench", "eval"]


def edge_agent(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *args], capture_output=True, text=True, timeout=timeout
    )


def test_top_level_help_lists_the_commands() -> None:
    result = edge_agent("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command: str) -> None:
    result = edge_agent(command, "--help")
    assert result.returncode == 0
    assert "usage: edge-agent" in result.stdout


def test_config_prints_effective_settings_with_secrets_masked(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "c.toml"
    path.write_text('[mqtt]\nusername = "u"\npassword = "hunter2"\n')
    result = edge_agent("config", "--config", str(path), "--broker", "mqtt://b:1999")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["mqtt"]["broker"] == "mqtt://b:1999"
    assert "hunter2" not in result.stdout


@pytest.mark.model
def test_submit_prints_the_reply(
    start_agent: AgentFactory, broker: LocalBroker, prefix: str
) -> None:
    agent = start_agent()
    env_prefix = ["--broker", broker.url]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent",
            "submit",
            "classify",
            "--text",
            "Pump P-1 running normally.",
            "--labels",
            "normal,fault",
            *env_prefix,
            "--device",
            agent.device_id,
            "--timeout",
            "60",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**agent.env},
    )
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["status"] == "done"
    assert reply["result"]["label"] in ("normal", "fault")


def test_submit_to_an_unreachable_broker_exits_69() -> None:
    from edge_agent.adapters.broker import free_port

    result = edge_agent(
        "submit",
        "classify",
        "--text",
        "x",
        "--labels",
        "a,b",
        "--broker",
        f"mqtt://127.0.0.1:{free_port()}",
        timeout=60,
    )
    assert result.returncode == 69
    assert "cannot reach broker" in result.stderr


def test_submit_times_out_with_75(broker: LocalBroker, prefix: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent",
            "submit",
            "classify",
            "--text",
            "x",
            "--labels",
            "a,b",
            "--broker",
            broker.url,
            "--timeout",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**__import__("os").environ, "EDGE_AGENT_MQTT__TOPIC_PREFIX": prefix},
    )
    assert result.returncode == 75


def test_select_json_for_a_4g_board() -> None:
    result = edge_agent("select", "--ram", "4G", "--json")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["selected"]["name"] == "phi-4-mini-instruct-q3_k_m"
    for key in ("family", "name", "quant", "file", "estimate_bytes"):
        assert key in body["selected"]
    assert body["candidates"]


def test_select_explain_lists_every_candidate() -> None:
    result = edge_agent("select", "--ram", "1G", "--explain")
    assert result.returncode == 0, result.stderr
    assert "selected  smollm2-360m-instruct-q8_0" in result.stdout
    assert "too big" in result.stdout
    assert "phi-4-mini-instruct-q8_0" in result.stdout


def test_probe_json() -> None:
    result = edge_agent("probe", "--json")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    for key in (
        "ram_total_bytes",
        "ram_available_bytes",
        "cgroup_memory_max_bytes",
        "memory_cgroup_enabled",
        "cpu_cores",
        "cpu_features",
        "architecture",
        "board_model",
        "disk_free_bytes",
        "runtime",
    ):
        assert key in body
    assert body["runtime"]["n_ctx"] == 2048


def test_models_subcommands_have_help() -> None:
    for action in ("list", "fetch", "verify", "gc", "lock"):
        result = edge_agent("models", action, "--help")
        assert result.returncode == 0, action


@pytest.mark.model
def test_eval_prints_accuracy_and_validity(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = Path(__file__).parent / "data" / "eval"
    result = edge_agent(
        "eval",
        str(data / "sensor_classify.jsonl"),
        str(data / "sensor_extract.jsonl"),
        "--limit",
        "4",
        "--json",
        "--state-dir",
        str(tmp_path),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    classify, extract = json.loads(result.stdout)
    # rows 0 and 3 are tune rows, 1 and 2 test rows (every third row is tuned on)
    assert classify["tune"]["rows"] == 2 and classify["test"]["rows"] == 2
    assert 0.0 <= classify["test"]["accuracy"] <= 1.0
    assert classify["test"]["exact_match"] is None
    assert extract["test"]["schema_validity"] == 1.0  # every extraction validates
    assert 0.0 <= extract["test"]["field_accuracy"] <= 1.0
    assert extract["latency_ms_p50"] > 0
    # the reliability table counts every test-row answer (classify) or field (extract) once
    assert sum(b["answers"] for b in classify["reliability"]) == 2
    expected_fields = sum(
        len(json.loads(line)["expected"])
        for line in (data / "sensor_extract.jsonl").read_text().splitlines()[1:3]
    )
    assert sum(b["answers"] for b in extract["reliability"]) == expected_fields


@pytest.mark.model
def test_bench_measures_and_keeps_the_figures(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = edge_agent(
        "bench", "--rounds", "1", "--json", "--state-dir", str(tmp_path), timeout=300
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["model"] == "smollm2-135m-instruct-q4_1"
    for key in (
        "prompt_tokens_per_second",
        "tokens_per_second",
        "constrained_tokens_per_second",
        "classify_ms_p50",
        "classify_ms_p95",
        "extract_ms_p50",
        "extract_ms_p95",
    ):
        assert figures[key] > 0, key
    kept = json.loads((tmp_path / "bench.json").read_text())
    assert kept["smollm2-135m-instruct-q4_1"]["tokens_per_second"] == figures["tokens_per_second"]


def test_eval_rejects_a_malformed_dataset(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no labels"}\n')
    result = edge_agent("eval", str(bad))
    assert result.returncode == 78
    assert "bad.jsonl:1" in result.stderr
