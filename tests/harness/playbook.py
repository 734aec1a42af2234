"""Runs the project's playbooks against one container board, as an operator would from a
controller (this machine), through the nsenter connection in tests/ansible_plugins/."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
ANSIBLE_DIR = ROOT / "ansible"
BIN = Path(sys.executable).parent
PLUGINS = ROOT / "tests" / "ansible_plugins" / "connection"


@dataclass
class Run:
    rc: int
    output: str
    recap: dict[str, int]
    seconds: float

    def tail(self) -> str:
        return self.output[-6000:]


def ansible_playbook(
    playbook: str,
    host: str,
    inventory: list[str],
    extra_vars: dict[str, Any],
    scratch: Path,
    number: int,
    env: dict[str, str] | None = None,
    timeout: float = 3600,
) -> Run:
    """ansible-playbook PLAYBOOK from ansible/ with `inventory`'s arguments and `extra_vars`
    (kept in `scratch`, with the output, as run `number`); `host`'s line of the recap."""
    vars_file = scratch / f"vars-{number}.json"
    vars_file.write_text(json.dumps(extra_vars))
    full_env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCAL_TEMP": str(scratch / "ansible-tmp"),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        **(env or {}),
    }
    started = time.monotonic()
    result = subprocess.run(
        [str(BIN / "ansible-playbook"), *inventory, "-e", f"@{vars_file}", playbook],
        cwd=ANSIBLE_DIR, env=full_env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    output = result.stdout + result.stderr
    (scratch / f"run-{number}.log").write_text(output)
    match = re.search(rf"^{re.escape(host)}\s+:\s+(.*)$", result.stdout, re.MULTILINE)
    assert match, output[-4000:]
    recap = {k: int(v) for k, v in (item.split("=") for item in match.group(1).split())}
    run = Run(result.returncode, output, recap, time.monotonic() - started)
    print(f"\n{playbook}: {run.seconds:.0f} s, rc {run.rc}, {match.group(1).strip()}")
    return run


def play(
    playbook: str, host: str, pid: int, extra_vars: dict[str, Any], scratch: Path, number: int
) -> Run:
    """ansible-playbook PLAYBOOK against `host`, the container whose PID 1 is `pid`; the
    inventory, variables and output are kept in `scratch` (run `number`)."""
    inventory = scratch / "inventory.yml"
    hostvars = {
        "ansible_connection": "nsenter",
        "ansible_nsenter_pid": pid,
        "ansible_python_interpreter": "/usr/bin/python3",
    }
    inventory.write_text(json.dumps({"edge_agents": {"hosts": {host: hostvars}}}))
    return ansible_playbook(
        playbook, host, ["-i", str(inventory)], {"edge_agent_rollout_hosts": host, **extra_vars},
        scratch, number, env={"ANSIBLE_CONNECTION_PLUGINS": str(PLUGINS)},
    )  # fmt: skip
