"""Fault scenarios at size, printed as the table README.md shows.

    .venv/bin/python -m bench.chaos            # all scenarios, full size (a few minutes)
    .venv/bin/python -m bench.chaos --quick    # the sizes tests/test_chaos.py uses
    .venv/bin/python -m bench.chaos --only fsync-0,fsync-1,dies

Each scenario starts its own Mosquitto and agents (the bundled model), streams jobs from a
sensor that retries late jobs with the same id, injects the fault (a broker SIGKILL, an
agent SIGKILL, a black-holed network, a slowed member of a shared subscription, a state
directory on a FUSE filesystem whose fsync takes a second, an inference thread that dies
through the test-only fault hook, clean stops during a long job, a state directory on a
full tmpfs, a wall clock stepped forward and back), and counts: jobs sent,
replies received, jobs lost (no reply although the deadline had not passed), jobs executed
twice (ran to completion more than once, over every agent's log), duplicate replies the
sensor saw, and the time from the end of the fault to the first reply after it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tests.harness import scenarios
from tests.harness.process import HEADER, Figures


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, as in the test suite")
    parser.add_argument(
        "--only",
        metavar="NAMES",
        help="comma-separated scenarios: broker, crash, hole, slow-off, slow-on, fsync-0, "
        "fsync-1, dies, stops, disk, clock",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edge-chaos-"))
    n = 1 if args.quick else 4
    rows: list[Figures] = []
    runs = [
        ("broker", lambda: scenarios.broker_restarts(work / "broker", jobs=24 * n, kills=2)),
        ("crash", lambda: scenarios.agent_crash(work / "crash", jobs=10 * n)),
        (
            "hole",
            lambda: scenarios.network_blackhole(
                work / "hole", jobs=12 * n, keepalive_s=5, hole_s=10 + 5 * (n > 1)
            ),
        ),
        (
            "slow-off",
            lambda: scenarios.shared_with_slow_member(
                work / "slow-off", jobs=18 * n, handoff=False
            )[0],
        ),
        (
            "slow-on",
            lambda: scenarios.shared_with_slow_member(work / "slow-on", jobs=18 * n, handoff=True)[
                0
            ],
        ),
        # the same FUSE filesystem without the delay first, for comparison
        ("fsync-0", lambda: scenarios.slow_fsync(work / "fsync-0", jobs=16 * n, fsync_ms=0)),
        ("fsync-1", lambda: scenarios.slow_fsync(work / "fsync-1", jobs=16 * n, fsync_ms=1000)),
        ("dies", lambda: scenarios.inference_dies(work / "dies", jobs=4 * n)),
        ("stops", lambda: scenarios.clean_stops(work / "stops", stops=2 * n)),
        ("disk", lambda: scenarios.disk_full(work / "disk", spooled=6 * n, jobs=4 * n)),
        ("clock", lambda: scenarios.clock_jumps(work / "clock", jobs=6 * n)),
    ]
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {name for name, _ in runs}
        if unknown:
            parser.error(f"unknown scenario {sorted(unknown)[0]!r}")
        runs = [(name, run) for name, run in runs if name in wanted]
    print(HEADER, flush=True)
    for _name, run in runs:
        fig = run()
        rows.append(fig)
        print(fig.row(), flush=True)
    bad = [f for f in rows if f.lost or f.executed_twice]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
