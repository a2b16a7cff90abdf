"""DVC stage `labels`: see :mod:`palm.labels`."""

from palm.config import run_stage
from palm.labels import main

if __name__ == "__main__":
    run_stage(main)
