"""The long fuzz campaign of the operations channel (tests/harness/opfuzz.py has the
generator and oracle; `make test` runs a short one):

    .venv/bin/python -m bench.opfuzz                  # 2,000 requests, seed 1
    .venv/bin/python -m bench.opfuzz --count 500 --seed random
"""

import sys

from tests.harness.opfuzz import main

if __name__ == "__main__":
    sys.exit(main())
