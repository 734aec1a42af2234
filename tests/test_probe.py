"""Board facts from a fake /proc and /sys tree (a Pi 5 with the memory cgroup off, and a
container with a cgroup limit), and from this machine."""

from __future__ import annotations

from pathlib import Path

from edge_agent.adapters.probe import (
    _board_model,
    _cgroup_memory_max,
    _cpu_features,
    _memory_controller,
    board_facts,
    soc_temperature,
    throttled_flags,
)


def make_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


PI5 = {
    "proc/device-tree/model": "Raspberry Pi 5 Model B Rev 1.0\x00",
    "proc/cpuinfo": "processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\n",
    "proc/self/cgroup": "0::/system.slice/edge-agent.service\n",
    "sys/fs/cgroup/cgroup.controllers": "cpuset cpu io pids\n",
    "sys/class/thermal/thermal_zone0/type": "cpu-thermal\n",
    "sys/class/thermal/thermal_zone0/temp": "61250\n",
    "sys/devices/platform/soc/soc:firmware/get_throttled": "50005\n",
}


def test_raspberry_pi_5_facts(tmp_path: Path) -> None:
    root = make_tree(tmp_path, PI5)
    assert _board_model(root) == "Raspberry Pi 5 Model B Rev 1.0"
    assert _cpu_features(root / "proc/cpuinfo", "aarch64") == ("neon", "dotprod", "fphp", "asimdhp")
    assert _memory_controller(root) is False  # Pi kernels ship it off
    assert _cgroup_memory_max(root) is None
    assert soc_temperature(root) == 61.25
    flags = throttled_flags(root)
    assert flags is not None
    assert flags["under_voltage"] and flags["throttled"] and flags["under_voltage_occurred"]
    assert not flags["frequency_capped"]


def test_cgroup_limit_is_the_tightest_on_the_path(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path,
        {
            "proc/self/cgroup": "0::/system.slice/edge-agent.service\n",
            "sys/fs/cgroup/cgroup.controllers": "cpuset cpu io memory pids\n",
            "sys/fs/cgroup/system.slice/edge-agent.service/memory.max": "2147483648\n",
            "sys/fs/cgroup/system.slice/memory.max": "max\n",
        },
    )
    assert _memory_controller(root) is True
    assert _cgroup_memory_max(root) == 2147483648


def test_x86_features_are_named_as_llama_cpp_does(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path, {"proc/cpuinfo": "flags\t\t: fpu sse avx avx2 fma f16c avx512f avx512bw\n"}
    )
    assert _cpu_features(root / "proc/cpuinfo", "x86_64") == (
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
    )


def test_missing_files_give_unknowns_not_errors(tmp_path: Path) -> None:
    assert _board_model(tmp_path) is None
    assert soc_temperature(tmp_path) is None
    assert throttled_flags(tmp_path) is None
    assert _memory_controller(tmp_path) is None


def test_this_machine() -> None:
    facts = board_facts()
    assert facts.cpu_cores >= 1
    assert facts.ram_total_bytes > 0
    assert facts.ram_budget_bytes <= facts.ram_total_bytes
    assert facts.to_dict()["architecture"] == facts.architecture
