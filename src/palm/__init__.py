"""palm-pipeline: screening fundus photographs for pathologic myopia with PaddlePaddle."""

import os as _os

# Paddle runs its CPU kernels on one thread unless OpenMP is told otherwise, and OpenMP
# reads this when Paddle's libraries load: set it before anything imports paddle.
# A value the user exported wins.
_os.environ.setdefault("OMP_NUM_THREADS", str(_os.cpu_count() or 1))
# Paddle's CPU kernels run on more than one OpenMP thread team (oneDNN's, and the one of
# element-wise kernels such as Adam's update). Spinning idle threads of one team then steal
# the cores from the other: measured here, a ResNet18 step went from 4 s to 14 s after the
# first Adam step. Idle threads that sleep instead of spinning avoid it.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_os.environ.setdefault("GLOG_minloglevel", "2")
