"""``python -m groupcomm``: the command line (see :mod:`groupcomm.cli`)."""

import sys

from groupcomm.cli import main

sys.exit(main())
