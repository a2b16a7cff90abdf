"""DVC stage `explain`: see :mod:`palm.evaluation.explain`."""

from palm.core.config import run_stage
from palm.evaluation.explain import main

if __name__ == "__main__":
    run_stage(main)
