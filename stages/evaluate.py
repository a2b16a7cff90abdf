"""DVC stage `evaluate`: see :mod:`palm.evaluate`."""

from palm.config import run_stage
from palm.evaluate import main

if __name__ == "__main__":
    run_stage(main)
