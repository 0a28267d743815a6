"""``python -m model.evaluation``."""
import sys

from model.evaluation.evaluate import main

sys.exit(main())
