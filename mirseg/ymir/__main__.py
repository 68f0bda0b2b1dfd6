"""``python -m mirseg.ymir``: the image's default command. Nothing may print before this runs."""

import sys

from mirseg.ymir.executor import main

sys.exit(main())
