"""``python -m hypervisor`` is ``pvlab``."""

import sys

from hypervisor.toolstack.cli import main

sys.exit(main())
