"""``python -m pyquant``."""

import sys

from pyquant.cli import main

sys.exit(main())
