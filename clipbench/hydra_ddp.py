"""Make Lightning's DDP launch safe inside a Hydra multirun.

Lightning starts ranks 1..N-1 by re-running the script with ``sys.argv`` plus
``hydra.run.dir=<HydraConfig.run.dir>``, and marks the parent as launched by setting ``LOCAL_RANK``
and friends in ``os.environ``. In a multirun both go wrong (the known lightning-hydra-template
problem): ``sys.argv`` is the whole sweep (``-m model.lr=1e-3,3e-3``), so every extra rank starts
the whole sweep again, in a directory that is not the job's; and the next job in the same parent
process finds ``LOCAL_RANK`` set, believes its ranks were launched externally, and waits for ranks
that never come. When a job fails, its extra ranks wait forever for rank 0, until Lightning's
watchdog sees one exit and kills the whole process, ending the sweep. And a ``MASTER_PORT`` in the
environment makes every job rendezvous on one port, where a failed job's store may still answer
with stale addresses. :func:`ddp_job` fixes all four.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import read_write

# Hydra's command-line flags that choose the primary config; children must compose the same one.
CONFIG_FLAGS = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir")


def child_argv(argv: list[str], job_overrides: list[str]) -> list[str]:
    """The command line of this job's extra ranks: the script, the config-choosing flags of ``argv``
    (``-cn train``, ``--config-dir=/x``, ...), and this job's overrides (not the sweep's)."""
    flags, args = [], iter(argv[1:])
    for arg in args:
        if arg.split("=", 1)[0] in CONFIG_FLAGS:
            flags += [arg] if "=" in arg else [arg, next(args, "")]
    return [argv[0], *flags, *job_overrides]


def launched_ranks(trainer: L.Trainer) -> list:
    """The processes Lightning's subprocess launcher started for ranks 1..N-1 (none for other
    launchers). Lightning keeps them in ``launcher.procs``, not a documented API: the one place we
    read it, checked by a test that fails if Lightning renames it."""
    return getattr(trainer.strategy.launcher, "procs", [])


def _pin_children_to_this_job(trainer: L.Trainer) -> None:
    """In a multirun job: children re-run exactly this job's overrides, in this job's directory,
    and a single-node job launched by Lightning rendezvous on a fresh port of its own."""
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    sys.argv = child_argv(sys.argv, hydra_cfg.overrides.task)
    with read_write(hydra_cfg.run):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    if trainer.num_nodes == 1 and "LOCAL_RANK" not in os.environ:
        os.environ.pop("MASTER_PORT", None)  # Lightning then picks a free port


def _stop_children(trainer: L.Trainer) -> None:
    """Stop this job's extra ranks. Lightning's watchdog thread watches the very list
    ``launcher.procs``: emptying it first tells the watchdog the job is over, so stopping the
    children does not make it kill this process (and the sweep) too."""
    procs = launched_ranks(trainer)
    children = list(procs)
    if not children:
        return
    procs.clear()
    for child in children:
        child.kill()
        child.wait()


@contextmanager
def ddp_job(trainer: L.Trainer) -> Iterator[None]:
    """Run one training job so that the next job of the same process starts its DDP afresh."""
    argv, environ = list(sys.argv), dict(os.environ)
    _pin_children_to_this_job(trainer)
    try:
        yield
    except BaseException:
        _stop_children(trainer)
        raise
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        sys.argv[:] = argv
        os.environ.clear()
        os.environ.update(environ)
