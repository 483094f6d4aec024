"""`python -m rau_rt` is the `rau-rt` command."""

import sys

from rau_rt.cli import main

sys.exit(main())
