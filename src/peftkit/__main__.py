"""``python -m peftkit`` — the command line (see `peftkit.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
