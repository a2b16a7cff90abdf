"""DVC stage `train`: see :mod:`palm.training.train`."""

from palm.core.config import run_stage
from palm.training.train import main

if __name__ == "__main__":
    run_stage(main)
