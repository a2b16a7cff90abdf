"""DVC stage `export`: see :mod:`palm.export`."""

from palm.config import run_stage
from palm.export import main

if __name__ == "__main__":
    run_stage(main)
