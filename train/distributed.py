"""Environment detection in one place: rank and world size.

torch.distributed when initialised, else the ``RANK``/``WORLD_SIZE`` variables that
torchrun (and our SLURM launcher, when it arrives) set, else a single process. Raw
``SLURM_*`` variables are deliberately not read here: inside an ``sbatch`` script without
``srun`` they describe the allocation, not this process.
"""

from __future__ import annotations

import os


def group_rank_and_world() -> tuple[int, int]:
    """(rank, size) of the initialised process group; (0, 1) without one (collectives such
    as all-gather need a real group, not just the launcher's variables)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover
        pass
    return 0, 1


def rank_and_world() -> tuple[int, int]:
    rank, size = group_rank_and_world()
    if size > 1:
        return rank, size
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1
