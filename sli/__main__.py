"""``python -m sli``: the CLI (what ``torchrun ... -m sli serve CACHE`` runs on every rank)."""

import sys

from sli.cli import main

sys.exit(main())
