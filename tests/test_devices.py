"""Device selection for torchrun (issue 13): every rank its own GPU, an explicit GPU refused under DDP."""
from __future__ import annotations

import pytest
import torch

from vo.train.distributed import pick_device


def test_cuda_takes_the_local_rank_gpu():
    assert pick_device("cuda", local_rank=1, world_size=2, cuda_available=True) == torch.device("cuda:1")
    assert pick_device("auto", local_rank=3, world_size=4, cuda_available=True) == torch.device("cuda:3")
    assert pick_device("auto", local_rank=3, world_size=4, cuda_available=False) == torch.device("cpu")
    assert pick_device("cuda:2", local_rank=0, world_size=1, cuda_available=True) == torch.device("cuda:2")


def test_one_named_gpu_for_every_rank_is_refused():
    with pytest.raises(ValueError, match=r"'cuda:0' names one GPU for all 2 torchrun processes"):
        pick_device("cuda:0", local_rank=1, world_size=2, cuda_available=True)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        pick_device("cuda", cuda_available=False)
    with pytest.raises(ValueError, match="expected auto, cpu or cuda"):
        pick_device("gpu")
