"""``python -m regate_fx inspect ...``: the ``regate-fx`` command line (regate_fx/inspect.py)."""

import sys

from regate_fx.inspect import main

sys.exit(main())
