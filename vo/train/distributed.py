"""Process-level set-up: devices, seeds, torchrun/DDP initialisation."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str = "auto", local_rank: int = 0, world_size: int = 1,
                cuda_available: bool | None = None) -> torch.device:
    """The device of this process for ``run.device``.

    ``auto`` -> the local rank's GPU when CUDA is present, else the CPU; ``cuda`` -> the local rank's GPU
    (``cuda:<LOCAL_RANK>``, so every torchrun process gets its own); ``cuda:N`` -> GPU ``N``, for a single
    process only (under torchrun every rank would land on one GPU: refused); ``cpu``.
    """
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if available else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda" and not name.startswith("cuda:"):
        raise ValueError(f"run.device: expected auto, cpu or cuda[:N], got '{name}'")
    if not available:
        raise RuntimeError(f"run.device: '{name}' requested but CUDA is not available")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    if world_size > 1:
        raise ValueError(f"run.device: '{name}' names one GPU for all {world_size} torchrun processes; use "
                         f"run.device=cuda (each process takes cuda:<LOCAL_RANK>) or CUDA_VISIBLE_DEVICES")
    return torch.device(name)


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Initialise the process group when launched by ``torchrun`` (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local, world)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device)


def shutdown_distributed() -> None:
    """Leave the process group together: a rank that tears down gloo's connections while another still
    talks on them aborts (``terminate called without an active exception``), which a loaded machine makes
    likely."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def step_generator(seed: int, step: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator determined by (seed, step, rank): the randomness of a training step.

    Using it (rather than the global generator) for everything random in a
    step makes a resumed run draw exactly what the uninterrupted run drew.
    """
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1))
    return g
