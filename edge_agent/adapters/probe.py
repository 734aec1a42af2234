"""Facts about this board, read from /proc, /sys and psutil.

Adapter: every read is tolerant (a file that is not there gives None) so the same code runs
on a Pi, an x86 laptop and inside a container. Decisions made from these facts live in
pure modules (`catalog.select`, telemetry payloads).
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

UNLIMITED = "max"
# CPU features llama.cpp's kernels care about, by architecture.
ARM_FEATURES = ("asimd", "asimddp", "i8mm", "sve", "fphp", "asimdhp")
X86_FEATURES = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vnni", "avx_vnni")


@dataclass(frozen=True)
class BoardFacts:
    """What does not change while the agent runs."""

    architecture: str
    cpu_cores: int
    cpu_features: tuple[str, ...]
    board_model: str | None
    ram_total_bytes: int
    cgroup_memory_max_bytes: int | None  # the cgroup v2 limit, when one is set
    memory_cgroup_enabled: bool | None  # None: not cgroup v2, cannot tell
    kernel: str

    @property
    def ram_budget_bytes(self) -> int:
        """RAM this process may use: the cgroup limit when lower than physical RAM."""
        limit = self.cgroup_memory_max_bytes
        return min(self.ram_total_bytes, limit) if limit else self.ram_total_bytes

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["cpu_features"] = list(self.cpu_features)
        out["ram_budget_bytes"] = self.ram_budget_bytes
        return out


def _usable_cores() -> int:
    """The cores this process may run on (a cpuset or `taskset` narrows them; a container
    pinned to one CPU of a 4-core host gets threads and jobs.parallel for one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def board_facts(root: Path = Path("/")) -> BoardFacts:
    arch = platform.machine()
    return BoardFacts(
        architecture=arch,
        cpu_cores=_usable_cores(),
        cpu_features=_cpu_features(root / "proc/cpuinfo", arch),
        board_model=_board_model(root),
        ram_total_bytes=int(psutil.virtual_memory().total),
        cgroup_memory_max_bytes=_cgroup_memory_max(root),
        memory_cgroup_enabled=_memory_controller(root),
        kernel=platform.release(),
    )


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _cpu_features(cpuinfo: Path, arch: str) -> tuple[str, ...]:
    text = _read(cpuinfo) or ""
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    arm = arch in ("aarch64", "arm64")
    if arm and cpuinfo == Path("/proc/cpuinfo"):
        # The kernel's hardware capabilities for this process, which is what llama.cpp
        # checks too; /proc/cpuinfo can describe another CPU (qemu-user shows the host's).
        flags |= _arm_hwcaps()
    wanted = ARM_FEATURES if arch in ("aarch64", "arm64", "armv7l") else X86_FEATURES
    found = [f for f in wanted if f in flags]
    if "asimd" in found:
        found[found.index("asimd")] = "neon"  # what llama.cpp's system info calls it
    if "asimddp" in found:
        found[found.index("asimddp")] = "dotprod"
    return tuple(found)


# AT_HWCAP / AT_HWCAP2 bits of arm64 (linux/arch/arm64/include/uapi/asm/hwcap.h).
_HWCAP = {"asimd": 1 << 1, "fphp": 1 << 9, "asimdhp": 1 << 10, "asimddp": 1 << 20, "sve": 1 << 22}
_HWCAP2 = {"i8mm": 1 << 13}


def _arm_hwcaps() -> set[str]:
    try:
        libc = ctypes.CDLL(None)
        getauxval = libc.getauxval
        getauxval.restype = ctypes.c_ulong
        getauxval.argtypes = [ctypes.c_ulong]
        hwcap, hwcap2 = int(getauxval(16)), int(getauxval(26))  # AT_HWCAP, AT_HWCAP2
    except (OSError, AttributeError):
        return set()
    found = {name for name, bit in _HWCAP.items() if hwcap & bit}
    return found | {name for name, bit in _HWCAP2.items() if hwcap2 & bit}


def _board_model(root: Path) -> str | None:
    text = _read(root / "proc/device-tree/model")
    if text:
        return text.rstrip("\x00\n ")
    for name in ("product_name", "board_name"):
        text = _read(root / "sys/class/dmi/id" / name)
        if text and text.strip():
            return text.strip()
    return None


def _own_cgroup(root: Path) -> Path | None:
    text = _read(root / "proc/self/cgroup") or ""
    for line in text.splitlines():
        if line.startswith("0::"):
            return root / "sys/fs/cgroup" / line[3:].strip().lstrip("/")
    return None


def _cgroup_memory_max(root: Path) -> int | None:
    """The tightest memory.max from this process's cgroup up to the root."""
    group = _own_cgroup(root)
    top = root / "sys/fs/cgroup"
    best: int | None = None
    while group is not None:
        text = _read(group / "memory.max")
        if text is not None and text.strip() != UNLIMITED:
            try:
                value = int(text.strip())
            except ValueError:
                value = None
            if value is not None:
                best = value if best is None else min(best, value)
        if group == top or top not in group.parents:
            break
        group = group.parent
    return best


def _memory_controller(root: Path) -> bool | None:
    """Whether the memory cgroup controller is on (Raspberry Pi kernels ship it off)."""
    text = _read(root / "sys/fs/cgroup/cgroup.controllers")
    if text is None:
        return None
    return "memory" in text.split()


@dataclass(frozen=True)
class Readings:
    """What changes: sampled for each telemetry message."""

    cpu_percent: float
    load_1m: float
    memory_total_bytes: int
    memory_available_bytes: int
    swap_used_bytes: int
    agent_rss_bytes: int
    disk_free_bytes: int | None
    soc_temperature_c: float | None
    throttled: dict[str, bool] | None
    uptime_s: float


class Sampler:
    """Takes readings; keeps the psutil handles so CPU percentages are per interval."""

    def __init__(self, disk_path: Path, root: Path = Path("/")) -> None:
        self.disk_path = disk_path
        self.root = root
        self._process = psutil.Process()
        self._process.cpu_percent(None)
        psutil.cpu_percent(None)
        self._started = time.monotonic()

    def read(self) -> Readings:
        vm = psutil.virtual_memory()
        return Readings(
            cpu_percent=float(psutil.cpu_percent(None)),
            load_1m=float(os.getloadavg()[0]),
            memory_total_bytes=int(vm.total),
            memory_available_bytes=int(vm.available),
            swap_used_bytes=int(psutil.swap_memory().used),
            agent_rss_bytes=int(self._process.memory_info().rss),
            disk_free_bytes=disk_free(self.disk_path),
            soc_temperature_c=soc_temperature(self.root),
            throttled=throttled_flags(self.root),
            uptime_s=time.monotonic() - self._started,
        )


def disk_free(path: Path) -> int | None:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return int(shutil.disk_usage(probe).free)
    except OSError:
        return None


def soc_temperature(root: Path = Path("/")) -> float | None:
    """The SoC (CPU) temperature in °C, from the thermal zone a Pi calls cpu-thermal."""
    zones = sorted((root / "sys/class/thermal").glob("thermal_zone*"))
    fallback: float | None = None
    for zone in zones:
        raw = _read(zone / "temp")
        if raw is None:
            continue
        try:
            value = int(raw.strip()) / 1000.0
        except ValueError:
            continue
        kind = (_read(zone / "type") or "").strip()
        if kind in ("cpu-thermal", "cpu_thermal", "soc_thermal", "x86_pkg_temp"):
            return value
        if fallback is None:
            fallback = value
    return fallback


# Bits of the Pi firmware's get_throttled value (also in /sys/devices/platform/soc/soc:firmware
# /get_throttled on recent kernels, readable without vcgencmd).
THROTTLE_BITS = {
    "under_voltage": 0,
    "frequency_capped": 1,
    "throttled": 2,
    "soft_temperature_limit": 3,
    "under_voltage_occurred": 16,
    "frequency_capped_occurred": 17,
    "throttled_occurred": 18,
    "soft_temperature_limit_occurred": 19,
}


def throttled_flags(root: Path = Path("/")) -> dict[str, bool] | None:
    for candidate in (
        root / "sys/devices/platform/soc/soc:firmware/get_throttled",
        root / "sys/devices/platform/firmware/get_throttled",
    ):
        raw = _read(candidate)
        if raw is None:
            continue
        try:
            value = int(raw.strip(), 16)
        except ValueError:
            continue
        return {name: bool(value >> bit & 1) for name, bit in THROTTLE_BITS.items()}
    return None


def available_ram() -> int:
    return int(psutil.virtual_memory().available)


def boot_id() -> str:
    """This boot's id (Linux: /proc/sys/kernel/random/boot_id), or "" when unknown. The
    monotonic clock counts from boot: a time kept with its boot can be read again on that
    clock by a later process of the same boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""
