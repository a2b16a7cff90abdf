"""DVC stage `evaluate`: see :mod:`palm.evaluation.evaluate`."""

from palm.core.config import run_stage
from palm.evaluation.evaluate import main

if __name__ == "__main__":
    run_stage(main)
