"""DVC stage `labels`: see :mod:`palm.data.labels`."""

from palm.core.config import run_stage
from palm.data.labels import main

if __name__ == "__main__":
    run_stage(main)
