"""DVC stage `explain`: see :mod:`palm.explain`."""

from palm.config import run_stage
from palm.explain import main

if __name__ == "__main__":
    run_stage(main)
