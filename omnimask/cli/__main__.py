"""``python -m omnimask.cli``: the ``omnimask`` command."""

import sys

from . import main

sys.exit(main())
