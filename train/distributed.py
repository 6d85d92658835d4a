"""Environment detection in one place: rank and world size (SLURM, torchrun, or one process)."""

from __future__ import annotations

import os


def rank_and_world() -> tuple[int, int]:
    """(rank, world_size): torch.distributed if initialised, else torchrun, else SLURM, else (0, 1)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover
        pass
    for r, w in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if r in os.environ and w in os.environ:
            return int(os.environ[r]), int(os.environ[w])
    return 0, 1
