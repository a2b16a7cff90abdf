"""DVC stage `preprocess`: see :mod:`palm.data.preprocess`."""

from palm.core.config import run_stage
from palm.data.preprocess import main

if __name__ == "__main__":
    run_stage(main)
