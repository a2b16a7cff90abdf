"""DVC stage `synthesize`: the embedded default data set, see :mod:`palm.synthesize` and :mod:`palm.synthetic`."""

from palm.config import run_stage
from palm.synthesize import main

if __name__ == "__main__":
    run_stage(main)
