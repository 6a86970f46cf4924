"""``python -m saelib.bench``: the same as ``saelib bench``."""

import sys

from . import main

sys.exit(main())
