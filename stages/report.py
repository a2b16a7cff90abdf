"""DVC stage `report`: see :mod:`palm.evaluation.report`."""

from palm.core.config import run_stage
from palm.evaluation.report import main

if __name__ == "__main__":
    run_stage(main)
