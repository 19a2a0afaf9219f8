"""``python -m groupcomm.cli``."""

import sys

from groupcomm.cli import main

sys.exit(main())
