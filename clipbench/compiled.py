"""Settings shared by the numba-compiled kernels."""

import os

import numba


def use_work_queue() -> None:
    """Run parallel kernels on numba's own work queue. OpenMP's threads spin while they wait, which
    starves everything else on a machine whose cores are shared; the work queue's do not. (An explicit
    NUMBA_THREADING_LAYER still wins.)"""
    if not os.environ.get("NUMBA_THREADING_LAYER"):
        numba.config.THREADING_LAYER = "workqueue"
