"""The scatter helpers equal plain Python loops."""
from __future__ import annotations

import pytest
import torch

from ba_layer import scatter


def loop_reduce(src, index, dim_size, reduce, fill=0.0):
    out = []
    for g in range(dim_size):
        rows = [src[e] for e in range(len(index)) if int(index[e]) == g]
        if not rows:
            out.append(torch.full_like(src[0], fill))
        elif reduce == "sum":
            out.append(torch.stack(rows).sum(0))
        elif reduce == "mean":
            out.append(torch.stack(rows).mean(0))
        elif reduce == "max":
            out.append(torch.stack(rows).max(0).values)
    return torch.stack(out)


@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
def test_scatter_equals_loop(reduce):
    g = torch.Generator().manual_seed(0)
    src = torch.randn(40, 3, 5, generator=g, dtype=torch.float64)
    index = torch.randint(0, 9, (40,), generator=g)
    index[index == 4] = 5                      # group 4 is empty
    fn = {"sum": scatter.scatter_sum, "mean": scatter.scatter_mean, "max": scatter.scatter_max}[reduce]
    got = fn(src, index, 9)
    want = loop_reduce(src, index, 9, reduce)
    assert torch.allclose(got, want, atol=1e-12)
    assert torch.all(got[4] == 0), "an empty group gives 0, not -inf"


def test_scatter_along_inner_dim_equals_loop():
    g = torch.Generator().manual_seed(1)
    src = torch.randn(2, 30, 4, generator=g, dtype=torch.float64)
    index = torch.randint(0, 6, (30,), generator=g)
    got = scatter.scatter_sum(src, index, 6, dim=1)
    want = torch.stack([loop_reduce(src[b], index, 6, "sum") for b in range(2)])
    assert torch.allclose(got, want, atol=1e-12)


def test_scatter_softmax_equals_loop_and_sums_to_one():
    g = torch.Generator().manual_seed(2)
    src = 10 * torch.randn(25, 4, generator=g, dtype=torch.float64)
    index = torch.randint(0, 5, (25,), generator=g)
    got = scatter.scatter_softmax(src, index, 5)
    want = torch.empty_like(src)
    for grp in range(5):
        sel = index == grp
        if sel.any():
            want[sel] = torch.softmax(src[sel], dim=0)
    assert torch.allclose(got, want, atol=1e-12)
    sums = scatter.scatter_sum(got, index, 5)
    present = scatter.scatter_count(index, 5) > 0
    assert torch.allclose(sums[present], torch.ones_like(sums[present]))


def test_scatter_gradients_match_loop():
    g = torch.Generator().manual_seed(3)
    src = torch.randn(20, 3, generator=g, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 4, (20,), generator=g)
    assert torch.autograd.gradcheck(lambda x: scatter.scatter_softmax(x, index, 4), (src,))
    assert torch.autograd.gradcheck(lambda x: scatter.scatter_mean(x, index, 4), (src,))


def test_unique_groups():
    ii = torch.tensor([0, 1, 0, 2, 1, 0])
    jj = torch.tensor([1, 2, 1, 3, 2, 2])
    group, n = scatter.unique_groups(ii, jj)
    assert n == 4
    for a in range(6):
        for b in range(6):
            same = bool(ii[a] == ii[b]) and bool(jj[a] == jj[b])
            assert (bool(group[a] == group[b])) == same


def test_bad_index_is_a_clear_error():
    with pytest.raises(ValueError, match=r"index: values must lie in \[0, 3\)"):
        scatter.scatter_sum(torch.ones(4), torch.tensor([0, 1, 2, 3]), 3)
    with pytest.raises(ValueError, match="index: expected a 1-D tensor of length 4"):
        scatter.scatter_sum(torch.ones(4), torch.tensor([0, 1]), 3)
