"""llama-bench and llama-server built from the llama.cpp sources vendored in the
llama-cpp-python sdist of the installed version, so the comparisons run the same llama.cpp
as the agent. Built once into a cache outside the repository:

    .venv/bin/python -m bench.llamacpp_tools          # build (a few minutes), print paths

The sdist comes from PyPI (`pip download --no-binary`), like every other dependency.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path

CACHE = Path(os.environ.get("EDGE_AGENT_TOOLS_CACHE", Path.home() / ".cache" / "edge-agent"))
TOOLS = ("llama-bench", "llama-server", "llama-batched-bench")


def tools_dir() -> Path:
    return CACHE / f"llama.cpp-{version('llama-cpp-python')}"


def tool(name: str) -> Path:
    return tools_dir() / "build" / "bin" / name


def ensure_tools() -> dict[str, Path]:
    if all(tool(name).exists() for name in TOOLS):
        return {name: tool(name) for name in TOOLS}
    root = tools_dir()
    root.mkdir(parents=True, exist_ok=True)
    src = root / "src"
    if not (src / "CMakeLists.txt").exists():
        wanted = f"llama-cpp-python=={version('llama-cpp-python')}"
        print(f"downloading the {wanted} sdist from PyPI", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             wanted, "-d", str(root)],
            check=True,
        )  # fmt: skip
        archive = next(root.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
        vendored = next(root.glob("llama_cpp_python-*/vendor/llama.cpp"))
        if src.exists():
            shutil.rmtree(src)
        shutil.move(str(vendored), src)
    build = root / "build"
    print(f"building {', '.join(TOOLS)} in {build} (a few minutes on 2 cores)", file=sys.stderr)
    subprocess.run(
        ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
         "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
         "-DBUILD_SHARED_LIBS=OFF", *_no_amx()],
        check=True,
    )  # fmt: skip
    subprocess.run(
        ["cmake", "--build", str(build), "--config", "Release", "-j", str(os.cpu_count() or 2),
         "--target", *TOOLS],
        check=True,
    )  # fmt: skip
    return {name: tool(name) for name in TOOLS}


def _no_amx() -> list[str]:
    """Leave out llama.cpp's AMX kernels where the CPU has AMX: they crash on some hosts
    (scripts/bootstrap.sh builds the agent's llama.cpp the same way)."""
    try:
        amx = "amx_int8" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        amx = False
    if not amx:
        return []
    flags = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    return [f"-DCMAKE_C_FLAGS={flags}", f"-DCMAKE_CXX_FLAGS={flags}"]


if __name__ == "__main__":
    for name, path in ensure_tools().items():
        print(f"{name}: {path}")
