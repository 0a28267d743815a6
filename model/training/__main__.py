"""``python -m model.training``."""
import sys

from model.training.train import main

sys.exit(main())
