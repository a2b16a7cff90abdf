"""DVC stage `unzip`: see :mod:`palm.unzip`."""

from palm.config import run_stage
from palm.unzip import main

if __name__ == "__main__":
    run_stage(main)
