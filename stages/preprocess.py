"""DVC stage `preprocess`: see :mod:`palm.preprocess`."""

from palm.config import run_stage
from palm.preprocess import main

if __name__ == "__main__":
    run_stage(main)
