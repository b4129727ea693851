"""``python -m lmprune`` (what ``torchrun -m lmprune prune ...`` runs): the command line."""

import sys

from .cli import main

sys.exit(main())
