"""palm-pipeline: screening fundus photographs for pathologic myopia with PaddlePaddle."""

import os as _os

# Paddle runs its CPU kernels on one thread unless OpenMP is told otherwise, and OpenMP
# reads this when Paddle's libraries load: set it before anything imports paddle.
# A value the user exported wins.
_os.environ.setdefault("OMP_NUM_THREADS", str(_os.cpu_count() or 1))
_os.environ.setdefault("GLOG_minloglevel", "2")
