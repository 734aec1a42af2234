"""What the running agent's memory is made of: its imports, and a real agent's mappings.

    .venv/bin/python -m bench.memory imports           # the imports of `edge-agent run`
    .venv/bin/python -m bench.memory imports numpy     # any modules, same table
    .venv/bin/python -m bench.memory agent             # a real agent, bundled model, warm
    .venv/bin/python -m bench.memory agent --jobs 0    # the same, as it starts
    .venv/bin/python -m bench.memory agent --set model.kv_cache_type=q8_0  # with a setting
    .venv/bin/python -m bench.memory --source DIR ...  # the same, for the tree in DIR

`imports` runs a fresh interpreter that imports what `edge-agent run` imports before it
serves (the CLI, logging, the composition root, the llama.cpp adapter) with the import
machinery wrapped: each module's own cost is the growth of resident memory while its code
ran, less what the modules it imported cost; the table adds them up per top-level package
(stdlib modules by their own top-level name) and names who imported each package first.
Resident memory is read from /proc/self/statm around every import, so figures are exact
for this process and order: a module imported first pays for what later ones share.

`agent` starts a broker and `edge-agent run` as the tests do (tests/harness/process.py),
sends the 10 classify and 10 extract jobs of bench/performance.py, and reads the agent's
/proc/<pid>/smaps: resident memory by kind of mapping, and the figure issue 16 targets,
resident memory minus the model file's resident pages (bench/performance.py subtracts the
file's size instead; both are printed). `--jobs 0` measures the agent as it starts, with
its model loaded, before any job.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

MIB = 2**20
# What `edge-agent run` imports before it serves: edge_agent/__main__.py -> cli.main,
# cmd_run -> adapters.log and service.app, Agent._load -> import_engine().
RUN_PATH = [
    "edge_agent.cli.main",
    "edge_agent.adapters.log",
    "edge_agent.service.app",
    "edge_agent.adapters.engine",
]

CHILD = r"""
import importlib, json, os, sys
import importlib._bootstrap as bootstrap

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss():
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE


records = []  # [name, importer, inclusive bytes, own bytes], in the order imports began
stack = []  # [name, bytes the imports it made cost]
original = bootstrap._find_and_load


def find_and_load(name, import_):
    record = [name, stack[-1][0] if stack else "-", 0, 0]
    records.append(record)
    stack.append([name, 0])
    start = rss()
    try:
        return original(name, import_)
    finally:
        inclusive = rss() - start
        _, children = stack.pop()
        if stack:
            stack[-1][1] += inclusive
        record[2:] = [inclusive, inclusive - children]


base = rss()
before = len(sys.modules)
bootstrap._find_and_load = find_and_load
for module in sys.argv[1:]:
    importlib.import_module(module)
bootstrap._find_and_load = original
records = [r for r in records if r[0] in sys.modules]  # not the optional ones that failed
print(json.dumps({"base": base, "total": rss(), "modules_before": before,
                  "modules": len(sys.modules), "records": records,
                  "stdlib": sorted(sys.stdlib_module_names)}))
"""


def with_bytecode() -> None:
    """An installed agent runs from .pyc files; compiling a module from source costs memory
    of its own (a megabyte or more for cli/main.py). So this process and the ones it starts
    write and use bytecode even under PYTHONDONTWRITEBYTECODE, and RUN_PATH is imported
    once to write it before anything is measured."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-c", f"import {', '.join(RUN_PATH)}"], check=True)


def measure_imports(modules: list[str]) -> dict[str, Any]:
    """Run CHILD in a fresh interpreter (as `edge-agent` runs) and return its JSON."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *modules], capture_output=True, text=True, check=True
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def by_package(result: dict[str, Any]) -> list[tuple[str, int, int, str]]:
    """(top-level package, own bytes of its modules, module count, first importer's
    top-level package), most expensive first."""
    cost: dict[str, int] = defaultdict(int)
    count: dict[str, int] = defaultdict(int)
    first: dict[str, str] = {}
    for name, importer, _inclusive, own in result["records"]:
        top = name.partition(".")[0]
        cost[top] += own
        count[top] += 1
        first.setdefault(top, importer.partition(".")[0])  # records are in start order
    rows = [(top, cost[top], count[top], first.get(top, "-")) for top in cost]
    return sorted(rows, key=lambda r: -r[1])


def print_imports(modules: list[str], detail: list[str]) -> None:
    result = measure_imports(modules)
    stdlib = set(result["stdlib"])
    rows = by_package(result)
    print(f"imports: {' '.join(modules)}")
    print(
        f"interpreter alone {result['base'] / MIB:.1f} MiB ({result['modules_before']} "
        f"modules); after the imports {result['total'] / MIB:.1f} MiB ({result['modules']} "
        f"modules): +{(result['total'] - result['base']) / MIB:.1f} MiB\n"
    )
    print("| package | MiB | modules | first imported by |\n|---|---|---|---|")
    for top, cost, count, importer in rows:
        kind = " (stdlib)" if top in stdlib else ""
        print(f"| {top}{kind} | {cost / MIB:.2f} | {count} | {importer} |")
    third = sum(c for t, c, _, _ in rows if t not in stdlib and t != "edge_agent")
    std = sum(c for t, c, _, _ in rows if t in stdlib)
    own = sum(c for t, c, _, _ in rows if t == "edge_agent")
    print(
        f"\nthird-party {third / MIB:.1f} MiB, stdlib {std / MIB:.1f} MiB, "
        f"edge_agent {own / MIB:.1f} MiB"
    )
    for package in detail:
        print(f"\n| {package} module | own MiB | with its imports, MiB | imported by |")
        print("|---|---|---|---|")
        mine = [r for r in result["records"] if r[0].partition(".")[0] == package]
        for name, importer, inclusive, own in sorted(mine, key=lambda r: -r[3]):
            print(f"| {name} | {own / MIB:.2f} | {inclusive / MIB:.2f} | {importer} |")


# ---- a real agent ------------------------------------------------------------------------


def smaps(pid: int, model: Path) -> dict[str, int]:
    """Resident bytes of a process by kind of mapping, from /proc/<pid>/smaps."""
    kinds: dict[str, int] = defaultdict(int)
    name = ""
    model_path = str(model.resolve())
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):  # a mapping's header: range perms offset dev inode [path]
            name = fields[5] if len(fields) > 5 else ""
            continue
        if fields[0] != "Rss:":
            continue
        size = int(fields[1]) * 1024
        if name == model_path:
            kind = "model file"
        elif name == "[heap]":
            kind = "heap"
        elif name.startswith("[stack"):
            kind = "stacks"
        elif name.startswith("["):
            kind = "other"
        elif name == "":
            kind = "anonymous"
        elif ".so" in name:
            kind = "shared libraries"
        else:
            kind = "other files"  # the interpreter's binary, locale data
        kinds[kind] += size
    kinds["total"] = sum(kinds.values())
    return dict(kinds)


def print_agent(jobs: int, settle_s: float, settings: list[str]) -> None:
    from bench.performance import bundled_model, warm_agent

    model = bundled_model()
    work = Path(tempfile.mkdtemp(prefix="edge-mem-"))
    env = {}
    for item in settings:
        key, _, value = item.partition("=")
        env["EDGE_AGENT_" + key.upper().replace(".", "__")] = value
    with warm_agent(work, jobs=jobs, env=env) as agent:
        time.sleep(settle_s)
        kinds = smaps(agent.proc.pid, model)
    total, mapped = kinds["total"], kinds.get("model file", 0)
    print(
        f"agent with {model.name} ({model.stat().st_size / MIB:.1f} MiB file), after {jobs} "
        f"classify and {jobs} extract jobs" + (f", with {' '.join(settings)}" if settings else "")
    )
    print("| mapping | resident MiB |\n|---|---|")
    for kind in ("model file", "anonymous", "heap", "shared libraries", "stacks", "other files",
                 "other", "total"):  # fmt: skip
        print(f"| {kind} | {kinds.get(kind, 0) / MIB:.1f} |")
    print(
        f"\nresident minus the model file's resident pages: {(total - mapped) / MIB:.1f} MiB "
        f"(minus its size, as bench/performance.py: "
        f"{(total - model.stat().st_size) / MIB:.1f} MiB)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source", type=Path, metavar="DIR", help="run the edge_agent package of this tree "
        "(a `git archive` of another commit, for before/after figures)",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="what", required=True)
    imports = sub.add_parser("imports", help="resident memory of imports, per package")
    imports.add_argument("modules", nargs="*", help=f"default: {' '.join(RUN_PATH)}")
    imports.add_argument(
        "--detail", action="append", default=[], metavar="PACKAGE",
        help="also list this top-level package's modules one by one",
    )  # fmt: skip
    agent = sub.add_parser("agent", help="a real agent's resident memory by mapping")
    agent.add_argument("--settle", type=float, default=2.0, help="seconds idle before reading")
    agent.add_argument(
        "--jobs", type=int, default=10, help="classify and extract jobs each (default 10; 0: "
        "the agent as it starts, model loaded)",
    )  # fmt: skip
    agent.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
        help="a setting for the agent, e.g. model.kv_cache_type=q8_0 (as its environment "
        "variable EDGE_AGENT_MODEL__KV_CACHE_TYPE)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.source is not None:
        # `python -m edge_agent` and `python -c` put their working directory first
        os.chdir(args.source)
    with_bytecode()
    if args.what == "imports":
        print_imports(args.modules or RUN_PATH, args.detail)
    else:
        print_agent(args.jobs, args.settle, args.settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
