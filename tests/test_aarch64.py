"""The rollout to a Raspberry Pi 5 from an x86-64 controller, and the agent on aarch64,
under qemu-user (`make test-aarch64`; not part of `make test`: figures in
docs/deployment.md).

site.yml, with `edge_agent_cross_build` and this machine as the build host, cross-compiles
llama-cpp-python for the Pi 5's Cortex-A76 (GGML_NATIVE=OFF, armv8.2-a+dotprod+fp16) with
Debian's aarch64 compiler at native speed, takes every other dependency from PyPI's
aarch64 wheels, and installs the release on an arm64 Debian bookworm tree
(scripts/test_tree.sh arm64: debootstrap minbase, its second stage under qemu-user)
through the nsenter connection, apt packages included. No board compiles anything. There,
under qemu-user: llama.cpp loads with NEON and dot-product kernels, `edge-agent probe` and
`select` report aarch64 and the Pi 5 choices, and the agent loads the bundled model and
answers classify and extract jobs from this machine's broker.

The container runs no systemd (the service itself is tested natively by
tests/test_systemd_rollout.py), so the role leaves the service alone and the test starts
the installed release where systemd would. Emulated speeds are not a Pi's. Everything
it starts (binfmt mount and registration, the container, its overlay, the agent) is
undone at the end, also on failure.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from edge_agent.adapters.broker import LocalBroker
from edge_agent.adapters.mqtt import Requester
from tests.harness import nspawn
from tests.harness.clients import reply_for
from tests.harness.playbook import play

MODEL = "smollm2-135m-instruct-q4_1"
BASE = "/opt/edge-agent"
DEVICE = "pi5-qemu"
PREFIX = f"t{uuid.uuid4().hex[:10]}"


def _why_not() -> str | None:
    if shutil.which("aarch64-linux-gnu-g++") is None:
        return "the aarch64 cross compiler is missing (scripts/bootstrap.sh aarch64)"
    return nspawn.why_not_aarch64()


# `aarch64`: only with --aarch64 (make test-aarch64), see tests/conftest.py.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.model,
    pytest.mark.aarch64,
    pytest.mark.skipif(_why_not() is not None, reason=str(_why_not())),
]


@dataclass
class ArmBoard:
    container: nspawn.Container
    scratch: Path
    figures: dict[str, str] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 600) -> str:
        return self.container.run(*args, timeout=timeout).stdout


@pytest.fixture(scope="module")
def arm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ArmBoard]:
    figures: dict[str, str] = {}
    with nspawn.qemu_aarch64():
        nspawn.reap_stale()
        started = time.monotonic()
        tree = nspawn.tree("arm64")
        print(f"\narm64 tree: {tree} ({time.monotonic() - started:.0f} s)")
        container = nspawn.Container(tree, boot=False)
        try:
            container.boot()
            yield ArmBoard(container, tmp_path_factory.mktemp("arm-controller"), figures)
        finally:
            container.close()
            for key, value in figures.items():  # for docs/deployment.md
                print(f"{key}: {value}")


@pytest.mark.timeout(5400)
def test_site_yml_cross_builds_on_the_controller_and_installs_an_aarch64_board(
    arm: ArmBoard, broker: LocalBroker
) -> None:
    assert arm.run("uname", "-m").strip() == "aarch64"
    run = play(
        "site.yml",
        DEVICE,
        arm.container.pid,
        {
            "ansible_become": False,
            "edge_agent_cross_build": True,
            "edge_agent_build_host": "localhost",
            "edge_agent_wheel_cache_dir": str(nspawn.CACHE / "controller" / "wheels"),
            "edge_agent_model_cache_dir": str(nspawn.CACHE / "controller" / "models"),
            "edge_agent_require_memory_cgroup": False,  # a container: no cgroup of its own
            "edge_agent_model_name": MODEL,
            "edge_agent_mqtt_broker": broker.url,
            "edge_agent_mqtt_topic_prefix": PREFIX,
            "edge_agent_config_extra": {
                "model": {"n_threads": 2},
                "telemetry": {"discovery_prefix": f"{PREFIX}-ha"},
            },
            "edge_agent_gate_enabled": False,  # no systemd here: the test starts the agent
        },
        arm.scratch,
        0,
    )
    assert run.rc == 0, run.tail()
    assert run.recap["failed"] == 0, run.recap
    arm.figures["site.yml, first run (qemu board)"] = f"{run.seconds:.0f} s"
    built = re.search(r"Cross-compiled llama-cpp-python for aarch64 in ([\d:.]+)", run.output)
    if built:
        arm.figures["cross-build of llama-cpp-python on the controller"] = built.group(1)
        print(f"cross-build: {built.group(1)}")
    assert "its service manager is" in run.output, "no systemd here: service left alone"

    # the wheelhouse: llama.cpp cross-built for aarch64, the rest PyPI's aarch64 wheels
    sums = list((nspawn.CACHE / "controller" / "wheels").glob("aarch64-py311/*/SHA256SUMS"))
    assert sums, "no aarch64 wheelhouse on the controller"
    wheels = [line.split()[1] for s in sums for line in s.read_text().splitlines()]
    assert any(re.fullmatch(r"llama_cpp_python-0\.3\.36-py3-none-linux_aarch64\.whl", w)
               for w in wheels), wheels  # fmt: skip
    assert not [w for w in wheels if "x86_64" in w], wheels
    venv = f"{BASE}/current/venv"
    assert arm.run(f"{venv}/bin/edge-agent", "--version").split() == ["edge-agent", "0.1.0"]
    # the wheel's libraries load under the board's own libc and libgomp
    system = arm.run(f"{venv}/bin/python", "-c",
                     "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())")  # fmt: skip
    print(f"llama.cpp system info (aarch64): {system.strip()}")
    assert "NEON = 1" in system and "DOTPROD = 1" in system, system
    arm.figures["llama.cpp system info"] = system.strip()
    for package in ("libgomp1", "python3-venv"):
        status = arm.run("dpkg-query", "-W", "-f=${Status}", package)
        assert status == "install ok installed", (package, status)


def test_probe_reports_aarch64(arm: ArmBoard) -> None:
    probe = json.loads(arm.run(f"{BASE}/current/venv/bin/edge-agent", "probe", "--json"))
    assert probe["architecture"] == "aarch64"
    # From the kernel's AT_HWCAP for this process, as llama.cpp reads it: qemu-user's
    # /proc/cpuinfo describes the x86 host and listed none.
    assert {"neon", "dotprod"} <= set(probe["cpu_features"]), probe["cpu_features"]
    print(f"probe: architecture {probe['architecture']}, cpu_features {probe['cpu_features']}, "
          f"runtime {probe['runtime']}")  # fmt: skip
    arm.figures["probe"] = (
        f"architecture {probe['architecture']}, cores {probe['cpu_cores']}, "
        f"cpu_features {probe['cpu_features']}"
    )


@pytest.mark.parametrize(
    ("ram", "expected"),
    [("4G", "phi-4-mini-instruct-q3_k_m"), ("8G", "phi-4-mini-instruct-q6_k")],
)
def test_select_picks_the_pi5_model_for_its_ram(arm: ArmBoard, ram: str, expected: str) -> None:
    """docs/models.md: a Pi 5 4 GB runs Phi-4-mini Q3_K_M, an 8 GB one Q6_K."""
    # without the board's config.toml, where the role pinned the bundled model for the test
    arm.run("touch", "/root/unpinned.toml")
    choice = json.loads(
        arm.run(f"{BASE}/current/venv/bin/edge-agent", "select", "--config", "/root/unpinned.toml",
                "--ram", ram, "--json")
    )  # fmt: skip
    assert choice["selected"]["name"] == expected, choice["selected"]
    arm.figures[f"select --ram {ram}"] = choice["selected"]["name"]


@pytest.mark.timeout(1200)
def test_the_agent_answers_classify_and_extract_jobs_under_emulation(
    arm: ArmBoard, broker: LocalBroker
) -> None:
    prefix = PREFIX
    log = arm.container.work / "agent.log"
    started = time.monotonic()
    # As the unit's ExecStart= runs it, with the config the role wrote.
    with log.open("wb") as out:
        agent = subprocess.Popen(
            ["nsenter", "-t", str(arm.container.pid), "-a", "--", "/usr/bin/env", "-i",
             *nspawn.ENV, f"{BASE}/current/venv/bin/edge-agent", "run",
             "--config", "/etc/edge-agent/config.toml", "--log-format", "json"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    client = Requester("127.0.0.1", broker.port, f"req-{uuid.uuid4().hex[:8]}")
    try:
        while "mqtt.connected" not in log.read_text(errors="replace"):
            assert agent.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() - started < 300, log.read_text()[-3000:]
            time.sleep(0.2)
        online = time.monotonic() - started
        events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        loaded = next(e for e in events if e.get("event") == "model.loaded")
        assert loaded["name"] == MODEL
        arm.figures["agent start to online (qemu)"] = (
            f"{online:.1f} s (model load {loaded['load_ms']} ms)"
        )
        print(f"agent online after {online:.1f} s; model loaded in {loaded['load_ms']} ms")

        client.connect()
        client.subscribe(f"{prefix}/replies/#")
        latencies: dict[str, list[float]] = {"classify": [], "extract": []}
        speeds: list[float] = []
        jobs: list[tuple[str, dict[str, Any]]] = []
        for i in range(3):
            jobs.append(("classify", {"text": f"Boiler B-{i} outlet 96 C, safety valve opened twice",
                                      "labels": ["normal", "warning", "critical"]}))  # fmt: skip
            jobs.append(("extract", {"text": f"Pump P-{i} at 71 C, vibration 11 mm/s",
                                     "schema": {"type": "object", "properties": {
                                         "device": {"type": "string"},
                                         "temperature_c": {"type": "number"}},
                                         "required": ["device", "temperature_c"]}}))  # fmt: skip
        for kind, body in jobs:
            job_id = f"{kind}-{uuid.uuid4().hex[:6]}"
            job = {"id": job_id, "reply_to": f"{prefix}/replies/arm", **body}
            sent = time.monotonic()
            client.publish(f"{prefix}/devices/{DEVICE}/jobs/{kind}", json.dumps(job).encode())
            reply = reply_for(client, job_id, timeout=300)
            latencies[kind].append(time.monotonic() - sent)
            assert reply["status"] == "done", reply
            assert reply["device"] == DEVICE
            if kind == "classify":
                assert reply["result"]["label"] in ("normal", "warning", "critical")
            else:
                assert isinstance(reply["result"]["data"]["temperature_c"], int | float), reply
                speeds.append(reply["timings"]["tokens_per_second"])
        for kind, values in latencies.items():
            figure = (f"median {1000 * statistics.median(values):.0f} ms over {len(values)} "
                      f"(first {1000 * values[0]:.0f} ms)")  # fmt: skip
            arm.figures[f"{kind} job round trip (qemu)"] = figure
            print(f"{kind}: {figure}")
        arm.figures["extract generation speed (qemu)"] = (
            f"{statistics.median(speeds):.1f} tokens/s (median)"
        )
    finally:
        client.close()
        # SIGTERM to the agent itself (nsenter forked it into the container's PID namespace)
        for child in psutil.Process(agent.pid).children():
            child.terminate()
        try:
            agent.wait(60)
        except subprocess.TimeoutExpired:
            agent.kill()
    assert '"event": "agent.stopped"' in log.read_text(), log.read_text()[-2000:]
