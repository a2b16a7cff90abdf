"""DVC stage `train`: see :mod:`palm.train`."""

from palm.config import run_stage
from palm.train import main

if __name__ == "__main__":
    run_stage(main)
