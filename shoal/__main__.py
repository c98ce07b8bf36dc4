"""``python -m shoal``: the same as the ``shoal`` command."""
import sys

from .cli import main

sys.exit(main())
