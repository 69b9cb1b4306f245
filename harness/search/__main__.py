"""`python -m harness.search SPEC`: see harness/search/cli.py."""

import sys

from harness.errors import handle
from harness.search.cli import main

sys.exit(handle("harness.search", main))
