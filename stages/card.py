"""DVC stage `card`: see :mod:`palm.evaluation.model_card`."""

from palm.core.config import run_stage
from palm.evaluation.model_card import main

if __name__ == "__main__":
    run_stage(main)
