"""`python -m harness.launch SPEC`: see harness/launch/cli.py."""

import sys

from harness.launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
