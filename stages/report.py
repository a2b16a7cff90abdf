"""DVC stage `report`: see :mod:`palm.report`."""

from palm.config import run_stage
from palm.report import main

if __name__ == "__main__":
    run_stage(main)
