"""DVC stage `export`: see :mod:`palm.serve.export`."""

from palm.core.config import run_stage
from palm.serve.export import main

if __name__ == "__main__":
    run_stage(main)
