"""Filters `pip install -v` output down to a progress line while llama.cpp compiles.

Shows "[n/total]" build steps as a bar on a terminal, or a line per 10% elsewhere (CI
logs); prints pip's result lines; on failure prints the last 60 lines it held back.
Standard library only: it runs before anything else is installed.
"""

import re
import sys
from collections import deque

STEP = re.compile(r"\[(\d+)/(\d+)\]")
KEEP = (
    "Successfully installed",
    "ERROR",
    "error:",
    "Building wheel for",
    "Created wheel for",
    "Using cached",
    "Requirement already satisfied: llama",
)


def main() -> int:
    tail: deque[str] = deque(maxlen=60)
    tty = sys.stdout.isatty()
    last_decile = -1
    failed = False
    for raw in sys.stdin:
        line = raw.rstrip("\n")
        tail.append(line)
        match = STEP.search(line)
        if match and ("vendor" in line or "llama" in line.lower()):
            done, total = int(match.group(1)), int(match.group(2))
            if tty:
                width = 40
                filled = width * done // max(total, 1)
                bar = "#" * filled + "." * (width - filled)
                sys.stdout.write(f"\r  building llama.cpp [{bar}] {done}/{total}")
                sys.stdout.flush()
            else:
                decile = 10 * done // max(total, 1)
                if decile != last_decile:
                    last_decile = decile
                    print(f"  building llama.cpp: {done}/{total} steps", flush=True)
            continue
        if line.lstrip().startswith(KEEP) and "Requirement already satisfied" not in line[:30]:
            if tty:
                sys.stdout.write("\n")
            print(f"  {line.strip()}", flush=True)
        if "ERROR" in line or "error: subprocess-exited-with-error" in line:
            failed = True
    if tty:
        print()
    if failed:
        print("\n".join(tail), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
