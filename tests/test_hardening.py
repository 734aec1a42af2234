"""Agent-side hardening: secrets stay secret, TLS mistakes stop the agent at once, job size
limits come from the configuration. (Broker-side TLS and ACLs: tests/test_broker_security.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from edge_agent.adapters.broker import LocalBroker
from edge_agent.adapters.mqtt import Requester
from edge_agent.adapters.settings import load_settings
from edge_agent.core.errors import Code, JobError
from edge_agent.core.protocol import Delivery, Topics, parse_job
from edge_agent.service.app import job_limits
from tests.harness.clients import reply_for
from tests.harness.process import start_agent_process

SECRET = "correct-horse-" + uuid.uuid4().hex


def test_the_password_is_never_logged_published_or_printed(
    broker: LocalBroker, prefix: str, tmp_path: Path
) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    (creds / "mqtt__password").write_text(SECRET + "\n")
    (creds / "tls_key").write_text("")  # the unit always loads it; empty means "not used"
    env = {"CREDENTIALS_DIRECTORY": str(creds), "EDGE_AGENT_MQTT__USERNAME": "pi-secret"}
    spy = Requester("127.0.0.1", broker.port, f"spy-{uuid.uuid4().hex[:6]}")
    spy.connect()
    spy.subscribe(f"{prefix}/#")
    spy.subscribe(f"{prefix}-ha/#")
    agent = start_agent_process(broker.url, prefix, tmp_path / "state", env=env)
    try:
        spy.publish(
            f"{prefix}/jobs/classify",
            json.dumps({"id": "s1", "text": "door opened", "labels": ["door", "fire"]}).encode(),
            response_topic=f"{prefix}/replies/spy",
        )
        reply = reply_for(spy, "s1")
        assert reply["status"] == "done"
        config = subprocess.run(
            [sys.executable, "-m", "edge_agent", "config"],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            timeout=60,
            check=True,
        )
        assert json.loads(config.stdout)["mqtt"]["password"] == "**********"
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(30) == 0
        time.sleep(0.5)
        seen = spy.drain()
    finally:
        agent.kill()
        spy.close()
    topics = {m.topic for m in seen}
    assert SECRET not in json.dumps(reply)
    assert f"{prefix}/devices/{agent.device_id}/info" in topics  # the spy did see the agent
    assert all(SECRET.encode() not in m.payload for m in seen)
    assert SECRET not in agent.log_path.read_text()
    assert SECRET not in config.stdout + config.stderr


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"ca_file": "hello\n"}, "mqtt.ca_file {dir}/ca_file: not a PEM file"),
        ({"ca_file": None}, "mqtt.ca_file {dir}/ca_file: No such file or directory"),
    ],
)
def test_a_tls_misconfiguration_stops_the_agent_before_the_model_loads(
    tmp_path: Path, files: dict[str, str | None], expected: str
) -> None:
    env = {}
    for name, content in files.items():
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        env[f"EDGE_AGENT_MQTT__{name.upper()}"] = str(path)
    agent = start_agent_process("mqtts://127.0.0.1:1", "edge", tmp_path / "s", env=env,
                                wait_online=False)  # fmt: skip
    assert agent.proc.wait(30) == 78  # EX_CONFIG: Restart=on-failure will not loop on it
    text = agent.log_path.read_text()
    assert expected.format(dir=tmp_path) in text
    assert "model.loaded" not in text


def test_a_certificate_that_does_not_match_its_key_is_refused(tmp_path: Path) -> None:
    from edge_agent.adapters.mqtt import tls_context
    from edge_agent.core.errors import ConfigError

    def make(name: str) -> tuple[Path, Path]:
        key, crt = tmp_path / f"{name}.key", tmp_path / f"{name}.crt"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", str(key), "-out", str(crt), "-days", "1", "-subj", f"/CN={name}"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        return crt, key

    a_crt, a_key = make("a")
    _, b_key = make("b")
    assert tls_context(str(a_crt), str(a_crt), str(a_key)).check_hostname
    with pytest.raises(ConfigError, match="cannot be used together"):
        tls_context(str(a_crt), str(a_crt), str(b_key))


def test_job_size_limits_come_from_the_configuration(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        "[jobs]\nmax_schema_depth = 3\nmax_schema_properties = 3\nmax_labels = 2\n"
        "max_label_chars = 8\nmax_payload_bytes = 2048\n"
    )
    limits = job_limits(load_settings(config))
    topics = Topics("edge", "pi-1", "g")

    def code(job: dict[str, object], kind: str) -> tuple[Code, str] | None:
        delivery = Delivery(f"edge/jobs/{kind}", json.dumps(job).encode(), 0.0)
        try:
            parse_job(delivery, topics, limits)
        except JobError as exc:
            return exc.code, exc.message
        return None

    def obj(props: dict[str, object]) -> dict[str, object]:
        return {"type": "object", "properties": props}

    extract = {"id": "x", "kind": "extract", "text": "t"}
    classify = {"id": "x", "kind": "classify", "text": "t"}
    assert (
        code({**extract, "schema": obj({"a": obj({"b": {"type": "string"}})})}, "extract") is None
    )
    deep = obj({"a": obj({"b": obj({"c": {"type": "string"}})})})
    assert code({**extract, "schema": deep}, "extract") == (
        Code.INVALID_SCHEMA,
        "schema.properties.a.properties.b.properties.c: nested deeper than 3 levels",
    )
    wide = obj({k: {"type": "string"} for k in "abcd"})
    assert code({**extract, "schema": wide}, "extract") == (
        Code.INVALID_SCHEMA,
        "schema: more than 3 properties in all",
    )
    assert code({**classify, "labels": ["a", "b"]}, "classify") is None
    assert code({**classify, "labels": ["a", "b", "c"]}, "classify") == (
        Code.INVALID_LABELS,
        "labels: more than 2",
    )
    assert code({**classify, "labels": ["a", "b" * 9]}, "classify") == (
        Code.INVALID_LABELS,
        "labels: each must be 1-8 characters, not blank",
    )
    big = code({**classify, "labels": ["a"], "pad": "x" * 2048}, "classify")
    assert big is not None and big[0] == Code.PAYLOAD_TOO_LARGE and "limit is 2048" in big[1]
    # pattern, $ref and the like are refused outright, so there is no regex to bound
    pattern = obj({"a": {"type": "string", "pattern": "(a+)+$"}})
    unsupported = code({**extract, "schema": pattern}, "extract")
    assert unsupported is not None and unsupported[0] == Code.UNSUPPORTED_SCHEMA
