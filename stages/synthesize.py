"""DVC stage `synthesize`: the embedded default data set, see :mod:`palm.data.synthesize` and :mod:`palm.data.synthetic`."""

from palm.core.config import run_stage
from palm.data.synthesize import main

if __name__ == "__main__":
    run_stage(main)
