"""Ansible connection into a running container's namespaces, with nsenter(1).

tests/test_systemd_rollout.py rolls edge-agent out to a Debian tree booted under
systemd-nspawn, as site.yml would to a board over SSH. community.docker.nsenter does the
same, but the test machines reach no Ansible Galaxy, and the PyPI package that carries it
(`ansible`, some 500 MB of collections) pins its own ansible-core and would replace the
project's. This is the small part the tests need: commands and file copies as root inside
the namespaces of the container's PID 1, under a clean environment; no become (the test
runs as root), no persistent shell.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from typing import Any

from ansible.errors import AnsibleConnectionFailure, AnsibleError, AnsibleFileNotFound
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

DOCUMENTATION = """
    name: nsenter
    short_description: run tasks in the namespaces of a process (a container's init)
    description:
        - Runs every command and file copy through C(nsenter -t PID -a), as root, with a
          clean environment. For systemd-nspawn containers in the project's tests.
    author: edge-agent maintainers
    options:
        nsenter_pid:
            description: Host PID of a process inside the target, normally the container's PID 1.
            type: int
            required: true
            vars:
                - name: ansible_nsenter_pid
    extends_documentation_fragment:
        - connection_pipelining
"""

display = Display()

# What a login shell on a board would have; the controller's PATH (a virtualenv) means
# nothing inside the container.
ENVIRONMENT = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME=/root", "LANG=C.UTF-8", "USER=root", "LOGNAME=root"]  # fmt: skip
TIMEOUT_S = 3600


class Connection(ConnectionBase):  # type: ignore[misc]  # ansible ships no type hints
    """Commands and files through nsenter into the target's namespaces."""

    transport = "nsenter"
    has_pipelining = True

    def _prefix(self) -> list[str]:
        pid = str(self.get_option("nsenter_pid"))
        return ["nsenter", "-t", pid, "-a", "--", "/usr/bin/env", "-i", *ENVIRONMENT]

    def _connect(self) -> Connection:
        if not self._connected:
            pid = self.get_option("nsenter_pid")
            if not os.path.exists(f"/proc/{pid}"):
                raise AnsibleConnectionFailure(f"no process {pid} to enter (is the container up?)")
            display.vvv(f"NSENTER CONNECTION TO PID {pid}", host=self._play_context.remote_addr)
            self._connected = True
        return self

    def exec_command(
        self, cmd: str, in_data: bytes | None = None, sudoable: bool = True
    ) -> tuple[int, bytes, bytes]:
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        display.vvv(f"EXEC {cmd}", host=self._play_context.remote_addr)
        result = subprocess.run(
            [*self._prefix(), "/bin/sh", "-c", cmd],
            input=in_data,
            stdin=None if in_data is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=TIMEOUT_S,
            check=False,
        )
        return result.returncode, result.stdout, result.stderr

    def put_file(self, in_path: str, out_path: str) -> None:
        super().put_file(in_path, out_path)
        display.vvv(f"PUT {in_path} TO {out_path}", host=self._play_context.remote_addr)
        if not os.path.exists(in_path):
            raise AnsibleFileNotFound(f"file or module does not exist: {in_path}")
        with open(in_path, "rb") as source:
            result = subprocess.run(
                [*self._prefix(), "/bin/sh", "-c", f"cat > {shlex.quote(out_path)}"],
                stdin=source,
                capture_output=True,
                timeout=TIMEOUT_S,
                check=False,
            )
        if result.returncode != 0:
            raise AnsibleError(f"failed to put {in_path} to {out_path}: {result.stderr!r}")

    def fetch_file(self, in_path: str, out_path: str) -> None:
        super().fetch_file(in_path, out_path)
        display.vvv(f"FETCH {in_path} TO {out_path}", host=self._play_context.remote_addr)
        with open(out_path, "wb") as target:
            result = subprocess.run(
                [*self._prefix(), "cat", "--", in_path],
                stdout=target,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                timeout=TIMEOUT_S,
                check=False,
            )
        if result.returncode != 0:
            raise AnsibleError(f"failed to fetch {in_path}: {result.stderr!r}")

    def close(self) -> None:
        self._connected = False

    def reset(self, *_: Any) -> None:
        self.close()
