"""Training data: which clips each step of each rank gets, loaded by a ``DataLoader``.

The clips of a step are a pure function of ``(seed, step, rank)``
(:func:`clip_index`: a ``DistributedSampler`` over seeded epoch permutations,
written as a function of the step), and a clip's augmentation a function of
``(its data set's seed, epoch, index)``: the data set is asked for the key
``(epoch, index)`` (:class:`EpochItems`), so it holds in every worker process.
A run resumed at step ``s`` starts a loader at ``s`` and gets what the
uninterrupted run got, with any number of workers.

Workers (``train.num_workers``) are seeded from a generator of ``(seed, rank,
start step)``, never from the global generator (whose state a checkpoint
restores), and run one torch thread each: the training process trains.
"""
from __future__ import annotations

import itertools

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

#: Seed of the generator that seeds a loader's workers: offsets the run's seed.
WORKER_SEED_OFFSET = 9_999_991


def clip_index(step: int, rank: int, world_size: int, batch_size: int, n_clips: int,
               seed: int) -> tuple[int, list[int]]:
    """Epoch and clip indices of one rank's batch at ``step``: epochs are seeded permutations split over ranks.

    Like a ``DistributedSampler`` with ``set_epoch``, but a pure function of
    the step, so a resumed run continues mid-epoch with the same clips.
    """
    per_step = world_size * batch_size
    steps_per_epoch = max(1, n_clips // per_step)
    epoch, pos = divmod(step, steps_per_epoch)
    perm = torch.randperm(n_clips, generator=torch.Generator().manual_seed(seed * 65_537 + epoch))
    start = pos * per_step + rank * batch_size
    return epoch, perm[[(start + b) % n_clips for b in range(batch_size)]].tolist()


def collate(items: list[dict]) -> dict:
    """Stack the clips' tensors along a new batch dimension; other values become lists."""
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


class EpochItems(Dataset):
    """A clip data set read by ``(epoch, index)`` keys: the epoch is set before each item (``set_epoch``, where
    the data set has it), in whichever process reads it."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


class StepBatchSampler(Sampler):
    """The ``(epoch, index)`` keys of one rank's batch for every step from ``start_step`` on (endless)."""

    def __init__(self, n_clips: int, batch_size: int, rank: int, world_size: int, seed: int, start_step: int = 0):
        if n_clips < 1:
            raise ValueError("training data: the data set has no clips")
        self.n_clips, self.batch_size = int(n_clips), int(batch_size)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.start_step = int(start_step)

    def __iter__(self):
        for step in itertools.count(self.start_step):
            epoch, indices = clip_index(step, self.rank, self.world_size, self.batch_size, self.n_clips, self.seed)
            yield [(epoch, i) for i in indices]


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)


def step_loader(dataset, start_step: int, *, batch_size: int, rank: int, world_size: int, seed: int,
                num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A loader of one rank's batches (:func:`collate`'d dicts of (B, ...) tensors) for steps ``start_step``,
    ``start_step + 1``, ...  ``pin_memory`` on CUDA (copy with ``non_blocking=True``)."""
    if num_workers < 0:
        raise ValueError(f"train.num_workers: expected a count >= 0, got {num_workers}")
    sampler = StepBatchSampler(len(dataset), batch_size, rank, world_size, seed, start_step)
    seeds = torch.Generator().manual_seed(
        ((seed + WORKER_SEED_OFFSET) * 1_000_003 + rank * 7_919 + start_step) % (2**63 - 1))
    return DataLoader(EpochItems(dataset), batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                      pin_memory=pin_memory, generator=seeds, worker_init_fn=_worker_init if num_workers else None)
