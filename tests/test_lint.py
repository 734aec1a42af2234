"""The code stays as STYLE.md asks: ruff (with the banned-API rule that keeps llama_cpp and
paho inside their adapters) and mypy --strict, run as part of `make test`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_check() -> None:
    result = run(str(BIN / "ruff"), "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format() -> None:
    result = run(str(BIN / "ruff"), "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict() -> None:
    result = run(str(BIN / "mypy"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_test_module_is_in_the_contract_that_keeps_tests_apart() -> None:
    """import-linter's wildcards cannot name `tests.test_*`, so pyproject.toml lists them:
    a new test module must be listed (no test imports another, nor conftest)."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contract = next(c for c in config["tool"]["importlinter"]["contracts"]
                    if c["name"].startswith("a test imports the harness"))  # fmt: skip
    modules = {f"tests.{p.stem}" for p in (ROOT / "tests").glob("test_*.py")}
    assert modules == set(contract["source_modules"])
    assert modules <= set(contract["forbidden_modules"])


def test_every_engine_module_but_the_context_is_held_model_free() -> None:
    """The contracts that keep llama.cpp's bindings inside engine/context.py list the
    engine's other modules by name: a new one must be listed too."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = {c["name"]: c for c in config["tool"]["importlinter"]["contracts"]}
    calls = next(c for n, c in contracts.items() if n.startswith("only the engine's context"))
    pure = next(c for n, c in contracts.items() if n.startswith("the engine's model-free"))
    package = ROOT / "edge_agent" / "adapters" / "engine"
    modules = {f"edge_agent.adapters.engine.{p.stem}" for p in package.glob("*.py")}
    logic = modules - {f"edge_agent.adapters.engine.{m}" for m in ("__init__", "context", "bindings", "facade")}  # fmt: skip
    assert logic == set(pure["source_modules"])
    assert logic | {"edge_agent.adapters.engine.facade"} <= set(calls["source_modules"])


def test_the_job_path_in_docs_architecture_names_code_that_exists() -> None:
    """Every `module.Class.method` in docs/architecture.md's "A job's path" table resolves
    (a bare `Class.method` or `_method` is looked up in the row's, or the last, class)."""
    import importlib
    import re

    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("## A job's path", 1)[1].split("\n\n", 2)[2].split("\n\n", 1)[0]
    classes: dict[str, object] = {}
    last: object = None
    missing = []
    for row in table.splitlines()[2:]:
        where = row.split("|")[2]
        for name in re.findall(r"`([A-Za-z_][\w.]*)`", where):
            parts = name.split(".")
            if parts[0] in ("core", "adapters", "service"):
                for cut in range(len(parts), 0, -1):
                    try:
                        obj: object = importlib.import_module("edge_agent." + ".".join(parts[:cut]))
                    except ImportError:
                        continue
                    rest = parts[cut:]
                    break
            elif parts[0] in classes:
                obj = last = classes[parts[0]]
                rest = parts[1:]
            else:
                obj, rest = last, parts
            for attr in rest:
                if not hasattr(obj, attr):
                    missing.append(name)
                    break
                obj = getattr(obj, attr)
                if isinstance(obj, type):
                    classes[obj.__name__], last = obj, obj
    assert not missing, missing
