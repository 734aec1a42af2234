"""The long protocol fuzz campaign (tests/harness/fuzz.py has the generator and oracle;
`make test` runs a short one):

    .venv/bin/python -m bench.fuzz                    # 20,000 messages, seed 1
    .venv/bin/python -m bench.fuzz --count 2000 --seed 7
    .venv/bin/python -m bench.fuzz --seed random      # a new seed, printed
"""

import sys

from tests.harness.fuzz import main

if __name__ == "__main__":
    sys.exit(main())
