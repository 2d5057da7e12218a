"""``python -m engram`` runs the command line."""

import sys

from engram.cli.main import main

sys.exit(main())
