"""``python -m model.inference``."""
import sys

from model.inference.cli import main

sys.exit(main())
