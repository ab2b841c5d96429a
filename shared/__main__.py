"""``python -m shared``: the operators' command line (see :mod:`shared.cli`)."""

import sys

from .cli import main

sys.exit(main())
