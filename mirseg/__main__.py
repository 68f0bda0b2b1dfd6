"""``python -m mirseg``: the same as the ``mirseg`` command (handy with torchrun)."""

import sys

from mirseg.cli import main

sys.exit(main())
