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
