"""The running agent imports only what it uses (issue 16: its memory, less the model).

What `edge-agent run` imports before it serves (the modules `python -m bench.memory
imports` measures) leaves out the other commands' code and libraries, and
llama-cpp-python's high-level layer: adapters/engine/bindings.py loads the ctypes bindings
alone, and the package stays whole for whoever asks it for more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# edge_agent/__main__.py -> cli.main; cmd_run -> adapters.log, service.app; the engine
RUN_PATH = (
    "edge_agent.cli.main",
    "edge_agent.adapters.log",
    "edge_agent.service.app",
    "edge_agent.adapters.engine",
)
NOT_IN_RUN = (
    "edge_agent.cli.console",  # tables and progress bars of the other commands
    "edge_agent.cli.demo",
    "edge_agent.service.benchmark",
    "edge_agent.service.evaluation",
    "edge_agent.adapters.broker",  # the demo's and the tests' Mosquitto
    "edge_agent.adapters.exporter",  # only with telemetry.prometheus_port
    "prometheus_client",
    "llama_cpp.llama",  # the high-level Llama class and what it brings:
    "llama_cpp.llama_chat_format",
    "jinja2",
    "diskcache",
    "multiprocessing",
    "rich",  # structlog imports it whenever it is installed
)


def python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, **env},
    )


def test_the_run_path_imports_none_of_the_other_commands_libraries() -> None:
    result = python(
        "import importlib, json, sys\n"
        f"for name in {RUN_PATH!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout))
    assert {"edge_agent.adapters.engine.bindings", "llama_cpp.llama_cpp", "numpy"} <= loaded
    assert sorted(loaded.intersection(NOT_IN_RUN)) == []


def test_llama_cpp_is_whole_for_whoever_asks_after_the_engine() -> None:
    result = python(
        "import sys\n"
        "from edge_agent.adapters.engine.bindings import bindings\n"
        "assert 'llama_cpp.llama' not in sys.modules\n"
        "import llama_cpp\n"
        "from llama_cpp import LlamaGrammar\n"
        "assert llama_cpp.llama_cpp is bindings\n"
        "assert llama_cpp.llama_backend_init is bindings.llama_backend_init\n"
        "print(llama_cpp.__version__, llama_cpp.Llama.__name__, LlamaGrammar.__name__)"
    )
    assert result.returncode == 0, result.stderr
    version, llama, grammar = result.stdout.split()
    assert version.count(".") == 2
    assert (llama, grammar) == ("Llama", "LlamaGrammar")


def test_the_bindings_loader_falls_back_to_the_ordinary_import() -> None:
    result = python(
        "import importlib.util, sys\n"
        "find = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'llama_cpp' else find(name, *a)\n"
        "from edge_agent.adapters.engine.bindings import bindings\n"
        "print(bindings.__name__, 'llama_cpp.llama' in sys.modules)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["llama_cpp.llama_cpp", "True"]


def test_a_library_that_does_not_load_is_still_named_and_leaves_nothing_behind() -> None:
    result = python(
        "import sys\n"
        "from edge_agent.core.errors import EngineUnavailable\n"
        "from edge_agent.service.loader import import_engine\n"
        "try:\n"
        "    import_engine()\n"
        "except EngineUnavailable as exc:\n"
        "    print(exc)\n"
        "print([m for m in sys.modules if m.startswith('llama_cpp')])",
        LLAMA_CPP_LIB_PATH="/nonexistent",
    )
    assert result.returncode == 0, result.stderr
    message, left = result.stdout.splitlines()
    assert message.startswith("llama.cpp's libraries cannot be loaded")
    assert left == "[]"
