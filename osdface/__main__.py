"""`python -m osdface`."""

import sys

from osdface.cli import main

sys.exit(main())
