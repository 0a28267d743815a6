"""``python -m model.data``."""
import sys

from model.data.cli import main

sys.exit(main())
