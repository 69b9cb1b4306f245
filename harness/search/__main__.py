"""`python -m harness.search SPEC`: see harness/search/cli.py."""
import sys

from harness.search.cli import main

sys.exit(main())
