"""``python -m captioner`` runs the command line."""

import sys

from captioner.cli import main

sys.exit(main())
