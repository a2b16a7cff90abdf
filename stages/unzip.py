"""DVC stage `unzip`: see :mod:`palm.data.unzip`."""

from palm.core.config import run_stage
from palm.data.unzip import main

if __name__ == "__main__":
    run_stage(main)
