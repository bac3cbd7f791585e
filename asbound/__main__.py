"""``python -m asbound`` runs the command line (as ``torchrun ... -m asbound`` does)."""

import sys

from asbound.cli import main

sys.exit(main())
