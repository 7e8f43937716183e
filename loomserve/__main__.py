"""``python -m loomserve`` is the ``loomserve`` command."""

import sys

from loomserve.cli import main

sys.exit(main())
