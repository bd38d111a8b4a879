"""``python -m promptdg_cli.collect DIR ...``: the same as ``promptdg collect DIR ...``."""
import sys

from .command import main

sys.exit(main())
