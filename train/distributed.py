"""Distributed training in one place: environment detection, the process group, the model
wrappers (DDP, FSDP2) and the few collectives the training loop needs.

Where rank and world size come from: an initialised process group; else the torchrun
variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``);
a SLURM task launched by ``omnimask submit`` gets those variables from submitit's
``JobEnvironment`` (``export_submitit_env``) before anything else runs. Raw ``SLURM_*``
variables are deliberately not read elsewhere: inside an ``sbatch`` script without
``srun`` they describe the allocation, not this process.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os

import torch

from omnimask.errors import ConfigError, OmnimaskError

log = logging.getLogger("omnimask.distributed")
PARALLEL = ("none", "ddp", "fsdp")


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


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_gpu() -> int:
    """This process's GPU among those it sees: its local rank, modulo the visible count (a
    launcher that binds one GPU per task leaves each process one, numbered 0)."""
    return local_rank() % max(1, torch.cuda.device_count())


def is_main() -> bool:
    return rank_and_world()[0] == 0


def export_submitit_env(port_base: int = 20000) -> dict[str, str]:
    """Inside a SLURM task started by submitit: set the torchrun variables from its
    ``JobEnvironment`` (rank, local rank, task count, the first node as the master, a
    port derived from the job id so concurrent jobs on a node do not collide)."""
    import submitit

    env = submitit.JobEnvironment()
    job = str(env.job_id).split("_")[0]
    port = port_base + int("".join(c for c in job if c.isdigit()) or "0") % 20000
    out = {"RANK": str(env.global_rank), "WORLD_SIZE": str(env.num_tasks),
           "LOCAL_RANK": str(env.local_rank), "MASTER_ADDR": env.hostnames[0],
           "MASTER_PORT": os.environ.get("MASTER_PORT", str(port))}
    os.environ.update(out)
    return out


def setup(device: torch.device, timeout_min: float = 30.0) -> bool:
    """Join the process group the launcher describes (gloo on CPU; on CUDA nccl for CUDA
    tensors and gloo for the CPU scalars ``all_max``/``all_mean``/``broadcast_str`` agree on:
    nccl alone refuses CPU tensors) when the world has more than one process; True when a
    group is up. Torn down at exit."""
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_world_size() > 1
    rank, world = rank_and_world()
    if world <= 1:
        return False
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ConfigError(f"WORLD_SIZE={world} but {var} is not set: launch with torchrun "
                              "or omnimask submit")
    if device.type == "cuda":
        torch.cuda.set_device(local_gpu() if device.index is None else device.index)
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=timeout_min))
    atexit.register(teardown)
    log.info("process group up: rank %d of %d (%s)", rank, world, backend)
    return True


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for_rank(device: torch.device) -> torch.device:
    """A CUDA device without an index becomes this process's local GPU; with several
    processes an explicit index (every rank on one GPU) is refused."""
    if device.type == "cuda" and rank_and_world()[1] > 1:
        if device.index is not None:
            raise ConfigError(f"trainer.device={device} puts every process on one GPU; with "
                              "several processes use cuda or auto (one GPU per process)")
        return torch.device("cuda", local_gpu())
    return device


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP2 shards on their own (all-gathered just before they run, freed
    after): the outermost elements of ``nn.ModuleList``s that hold parameters (the
    trunk's blocks, the decoders' layers). The root takes the rest (embeddings, tied
    heads)."""
    out: list[torch.nn.Module] = []

    def visit(m: torch.nn.Module) -> None:
        for c in m.children():
            if isinstance(m, torch.nn.ModuleList) and any(True for _ in c.parameters()):
                out.append(c)
            else:
                visit(c)

    visit(model)
    return out


def lift_scalars(model: torch.nn.Module) -> list[str]:
    """FSDP2 shards no 0-d parameters: each (a contrastive logit scale) becomes a
    1-element vector in place, same value (broadcasting keeps the maths). Returns their
    state-dict names, so checkpoints can store them as 0-d again."""
    lifted = []
    for mod_name, mod in model.named_modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.ndim == 0:
                setattr(mod, name, torch.nn.Parameter(p.detach().reshape(1),
                                                      requires_grad=p.requires_grad))
                lifted.append(f"{mod_name}.{name}" if mod_name else name)
    return lifted


def wrap(model: torch.nn.Module, parallel: str, device: torch.device) -> torch.nn.Module:
    """``model`` for data-parallel training: DDP (a replica per rank, gradients averaged)
    or FSDP2 (``fully_shard``: parameters, gradients and optimizer state split across
    ranks). Without a process group of more than one rank the model comes back as is."""
    import torch.distributed as dist

    if parallel not in PARALLEL:
        raise ConfigError(f"trainer.parallel must be {'|'.join(PARALLEL)}, got {parallel!r}")
    if parallel == "none" or not (dist.is_initialized() and dist.get_world_size() > 1):
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # some heads leave parameters unused on a step (one objective per step)
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if any(p.ndim == 0 for p in model.parameters()):
        raise ValueError("fully_shard needs no 0-d parameters: lift_scalars(model) first")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a DDP wrapper (FSDP2 shards in place: the same module)."""
    return getattr(model, "module", model) if type(model).__name__ == \
        "DistributedDataParallel" else model


def is_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, FSDPModule)


def all_max(values: list[float]) -> list[float]:
    """Element-wise maximum over ranks (identity without a group): agreeing on flags."""
    import torch.distributed as dist

    if group_rank_and_world()[1] <= 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_mean(values: list[float]) -> list[float]:
    """Element-wise mean over ranks (identity without a group): logged losses."""
    import torch.distributed as dist

    size = group_rank_and_world()[1]
    if size <= 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / size).tolist()


def barrier() -> None:
    import torch.distributed as dist

    if group_rank_and_world()[1] > 1:
        dist.barrier()


def broadcast_str(text: str) -> str:
    """Rank 0's ``text`` on every rank (a checkpoint's path: rank 0 decides)."""
    import torch.distributed as dist

    if group_rank_and_world()[1] <= 1:
        return text
    data = torch.zeros(4096, dtype=torch.uint8)
    raw = text.encode()[:4096]
    if dist.get_rank() == 0 and raw:
        data[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    dist.broadcast(data, src=0)
    return bytes(data[data != 0].tolist()).decode()


class Forward:
    """What a loss function calls the model through: calls go to the DDP/FSDP entry
    point (so gradients are synchronised), attributes to the plain module."""

    def __init__(self, module: torch.nn.Module, wrapped: torch.nn.Module) -> None:
        self._module, self._wrapped = module, wrapped

    def __call__(self, *args, **kwargs):
        return self._wrapped(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._module, name)


class _NoLock:
    def release(self) -> None:
        pass


def run_lock(run):
    """The run directory's lock, held by rank 0 for all ranks."""
    from omnimask.runlock import RunLock

    return RunLock(run) if is_main() else _NoLock()


@contextlib.contextmanager
def rank0_first(parallel: str, device_name: str):
    """Build on rank 0 first (it writes the run directory's shared files: corpus cache,
    vocabulary, config), then on the others, which find them made. With several processes
    the process group comes up here; a failure on rank 0 stops the others with an error
    instead of leaving them waiting."""
    from .trainer import resolve_device

    rank, world = rank_and_world()
    if world > 1:
        if parallel == "none":
            raise ConfigError(f"launched as {world} processes but trainer.parallel=none "
                              "(each would train alone): set trainer.parallel=ddp or fsdp")
        setup(device_for_rank(resolve_device(device_name)))
        if rank != 0 and all_max([0.0])[0]:
            raise OmnimaskError("rank 0 failed while building the run (see its log)")
    failed = 1.0
    try:
        yield
        failed = 0.0
    finally:
        if world > 1 and rank == 0:
            all_max([failed])
