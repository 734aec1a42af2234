"""A Debian tree booted under a real systemd with systemd-nspawn, for the rollout tests.

The tree (scripts/test_tree.sh) is cached and never written: each `Container` boots an
overlay of its own on top of it (the upper layer in a scratch directory), so every test
module starts from a clean board and leaves the cache as it was. The container shares
the host's network (a test broker on 127.0.0.1 is reachable from inside) and gets its own
PID, mount, IPC and UTS namespaces; commands run inside through nsenter, as Ansible's
connection does (tests/ansible_plugins/connection/nsenter.py).

`close()` powers the container off (SIGTERM to nspawn, which asks its systemd to shut
down), kills what is left, unmounts the overlay and removes the scratch directory; it is
safe to call twice and after a failed boot. `reap_stale()` does the same for containers
a killed test run left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent.parent
CACHE = Path(os.environ.get("EDGE_AGENT_TEST_CACHE", "/var/cache/edge-agent-test"))
# Scratch space for containers (overlay upper layers), outside the repository.
SCRATCH = CACHE / "containers"
ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root",
       "LANG=C.UTF-8", "SYSTEMD_PAGER=cat", "SYSTEMD_COLORS=0"]  # fmt: skip


def why_not() -> str | None:
    """Why this machine cannot boot a container, or None when it can."""
    if os.geteuid() != 0:
        return "booting a systemd-nspawn container needs root"
    for tool in ("systemd-nspawn", "nsenter", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/bootstrap.sh test installs it as root)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs"
    return None


def tree(arch: str = "amd64", extra: str = "") -> Path:
    """The cached Debian tree for `arch` (with `extra` packages, comma-separated), built
    the first time (about a minute for amd64)."""
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "test_tree.sh"), arch, *([extra] if extra else [])],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"scripts/test_tree.sh {arch} failed:\n{result.stderr[-3000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def _unmount(path: Path) -> None:
    if os.path.ismount(path):
        subprocess.run(["umount", str(path)], capture_output=True, check=False)
    if os.path.ismount(path):  # still busy: detach it, it goes once the last user does
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def _stop_nspawn(pid: int, timeout: float) -> None:
    """SIGTERM makes nspawn power the container off; SIGKILL ends it all (the container's
    PID namespace dies with its init)."""
    try:
        nspawn = psutil.Process(pid)
        if "nspawn" not in nspawn.name():
            return  # the pid was reused: not ours
    except psutil.NoSuchProcess:
        return
    members = [nspawn, *nspawn.children(recursive=True)]
    with contextlib.suppress(psutil.NoSuchProcess):
        nspawn.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(members, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)


def reap_stale() -> None:
    """Power off and remove containers whose test run died before its clean-up."""
    if not SCRATCH.exists():
        return
    for work in SCRATCH.iterdir():
        owner = work / "owner.pid"
        try:
            owner_pid = int(owner.read_text())
        except (OSError, ValueError):
            owner_pid = 0
        if owner_pid and psutil.pid_exists(owner_pid):
            continue  # another test run's, still going
        pid_file = work / "nspawn.pid"
        if pid_file.exists():
            with contextlib.suppress(ValueError):
                _stop_nspawn(int(pid_file.read_text()), timeout=20)
        _unmount(work / "root")
        shutil.rmtree(work, ignore_errors=True)


class Container:
    """One container over `lower` (a cached tree): booted with its systemd as PID 1, or,
    with `boot=False`, only a long sleep as PID 2 under nspawn's stub init (for a foreign
    architecture under qemu-user, where the tests run commands, not services)."""

    def __init__(self, lower: Path, name: str | None = None, boot: bool = True) -> None:
        self.lower = lower
        self.name = name or f"edge-test-{uuid.uuid4().hex[:6]}"
        self.booted = boot
        self.work = SCRATCH / self.name
        self.root = self.work / "root"
        self.console = self.work / "console.log"
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.pid = 0  # host PID nsenter enters: the container's systemd, or its sleep
        self.boot_s = 0.0

    def boot(self, timeout: float = 60) -> Container:
        for sub in ("upper", "overlay-work", "root"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        (self.work / "owner.pid").write_text(str(os.getpid()))
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={self.lower},upperdir={self.work / 'upper'},workdir={self.work / 'overlay-work'}",
             str(self.root)],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        started = time.monotonic()
        with self.console.open("wb") as console:
            # --register=no: the host has no systemd-machined; --keep-unit: nor a systemd
            # to make a scope with. The host's network is shared (no --private-network).
            mode = ["-b"] if self.booted else ["--as-pid2"]
            command = [] if self.booted else ["/bin/sleep", "infinity"]
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "--quiet", "-D", str(self.root), f"--machine={self.name}",
                 *mode, "--register=no", "--keep-unit", "--console=pipe", *command],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        (self.work / "nspawn.pid").write_text(str(self.nspawn.pid))
        deadline = started + timeout
        while not self.pid:
            if self.nspawn.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited: {self.console_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no init in the container: {self.console_text()[-3000:]}")
            with contextlib.suppress(psutil.NoSuchProcess):
                # booted: the container's systemd (PID 1) once nspawn's child has exec'd
                # it; otherwise the sleep under nspawn's stub init
                want = "systemd" if self.booted else "sleep"
                for child in psutil.Process(self.nspawn.pid).children(recursive=True):
                    if child.name() == want:
                        self.pid = child.pid
            time.sleep(0.05)
        if not self.booted:
            self.boot_s = time.monotonic() - started
            return self
        # Until its own bus is up, systemctl inside cannot ask systemd anything.
        while True:
            left = max(1.0, deadline - time.monotonic())
            state = self.run("systemctl", "is-system-running", "--wait", timeout=left, check=False)
            if state.stdout.strip() in ("running", "degraded"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the container's systemd is {state.stdout.strip()!r}: {state.stderr.strip()}"
                )
            time.sleep(0.1)
        self.boot_s = time.monotonic() - started
        return self

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def run(
        self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside, as root, in a clean environment."""
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-a", "--", "/usr/bin/env", "-i", *ENV, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result

    def sh(self, script: str, check: bool = True, timeout: float = 120) -> str:
        return self.run("/bin/sh", "-c", script, check=check, timeout=timeout).stdout

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show` properties of a unit."""
        out = self.run("systemctl", "show", unit, "-p", ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def path(self, inside: str) -> Path:
        """Where a file of the container's is on the host (through the overlay mount;
        resolve no absolute symlinks through it)."""
        return self.root / inside.lstrip("/")

    def close(self) -> None:
        if self.nspawn is not None:
            _stop_nspawn(self.nspawn.pid, timeout=30)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.nspawn.wait(10)
            self.nspawn = None
        _unmount(self.root)
        shutil.rmtree(self.work, ignore_errors=True)
        # nspawn keeps a directory per machine name for mount propagation
        shutil.rmtree(Path("/run/systemd/nspawn/propagate") / self.name, ignore_errors=True)


BINFMT = Path("/proc/sys/fs/binfmt_misc")
QEMU_AARCH64 = Path("/usr/share/binfmts/qemu-aarch64")  # Debian's qemu-user-static


def why_not_aarch64() -> str | None:
    """Why this machine cannot run aarch64 binaries under qemu-user, or None."""
    if os.geteuid() != 0:
        return "registering qemu-user with binfmt_misc and debootstrap need root"
    if not QEMU_AARCH64.exists():
        return "qemu-user-static is not installed (scripts/bootstrap.sh aarch64 installs it)"
    if "binfmt_misc" not in Path("/proc/filesystems").read_text():
        return "the kernel has no binfmt_misc"
    return why_not()


@contextlib.contextmanager
def qemu_aarch64() -> Iterator[None]:
    """aarch64 ELF binaries run under qemu-user inside this block: binfmt_misc is mounted
    and qemu-aarch64 registered when they were not, and both undone afterwards. The entry
    has the F flag (the kernel opens the interpreter now), so it works inside a container
    that has no qemu of its own."""
    mounted = registered = False
    if not (BINFMT / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], check=True)
        mounted = True
    try:
        if not (BINFMT / "qemu-aarch64").exists():
            fields = dict(
                line.split(" ", 1) for line in QEMU_AARCH64.read_text().splitlines() if " " in line
            )
            flags = ("F" if fields.get("fix_binary") == "yes" else "") + (
                "P" if fields.get("preserve") == "yes" else ""
            )
            entry = (
                f":qemu-aarch64:M:{fields['offset']}:{fields['magic']}:{fields['mask']}"
                f":{fields['interpreter']}:{flags or 'F'}"
            )
            (BINFMT / "register").write_text(entry)
            registered = True
        yield
    finally:
        if registered:
            with contextlib.suppress(OSError):
                (BINFMT / "qemu-aarch64").write_text("-1")
        if mounted:
            _unmount(BINFMT)
