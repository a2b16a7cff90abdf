"""palm-pipeline: screening fundus photographs for pathologic myopia with PaddlePaddle."""

import os as _os
import warnings as _warnings

# Paddle's CPU kernels run on more than one OpenMP thread team (oneDNN's, and the one of
# element-wise kernels such as Adam's update). Spinning idle threads of one team then steal
# the cores from the other: measured here, a ResNet18 step went from 4 s to 14 s after the
# first Adam step. Idle threads that sleep instead of spinning avoid it. OpenMP reads this
# when Paddle's libraries load: set it before anything imports paddle. A value the user
# exported wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_os.environ.setdefault("GLOG_minloglevel", "2")
# Paddle warns at every import that it found no ccache (a compiler cache for C++ extensions,
# which this project does not build). The thread count is set per process by
# palm.core.runtime.select_device (all cores, or this run's share), not through OMP_NUM_THREADS,
# whose value above 1 makes Paddle print a warning at import.
_warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning)

from palm.core import runtime as _runtime  # noqa: E402  (reads OMP_NUM_THREADS before Paddle does)

# The same code paths on every x86-64 CPU (numpy, MKL, oneDNN, OpenCV): set before they load.
_runtime.pin_code_paths()
