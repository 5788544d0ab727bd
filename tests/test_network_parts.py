"""Network parts against plain reference computations: correlation lookup, graph, patches, blocks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vo.model.blocks import GradientClamp, SoftAggregate
from vo.model.correlation import AllPairsCorrBlock, CorrBlock
from vo.model.graph import clip_graph
from vo.model.patches import gather_patches, patch_grid, select_centres


def naive_lookup(fmap, patch_features, coords, jj, kk, radius, level):
    """Bilinear correlation by sampling the full feature map at every lookup position (zero outside)."""
    B, N, C, h, w = fmap.shape
    if level > 1:
        fmap = F.avg_pool2d(fmap.reshape(B * N, C, h, w), level, level).reshape(B, N, C, h // level, w // level)
        coords = (coords + 0.5) / level - 0.5
    h, w = fmap.shape[-2:]
    P = patch_features.shape[-1]
    E = jj.shape[0]
    off = torch.arange(-radius, radius + 1, dtype=coords.dtype)
    out = torch.zeros(B, E, P, P, 2 * radius + 1, 2 * radius + 1, dtype=coords.dtype)
    for b in range(B):
        for e in range(E):
            f = fmap[b, jj[e]][None]                                  # (1, C, h, w)
            for py in range(P):
                for px in range(P):
                    x = coords[b, e, py, px, 0] + off.view(1, -1)
                    y = coords[b, e, py, px, 1] + off.view(-1, 1)
                    x, y = torch.broadcast_tensors(x, y)
                    grid = torch.stack([2 * x / (w - 1) - 1, 2 * y / (h - 1) - 1], dim=-1)[None]
                    sampled = F.grid_sample(f, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
                    g = patch_features[b, kk[e], :, py, px]
                    out[b, e, py, px] = (sampled * g[:, None, None]).sum(0) / C ** 0.5
    return out.reshape(B, E, -1)


def _corr_problem(seed: int, C: int, E: int, requires_grad: bool = False):
    """Feature maps (2, 3, C, 16, 20), features of 5 patches per batch, and ``E`` edges whose reprojections are
    slightly distorted 3x3 grids (perspective) around random centres, some near or beyond the border."""
    g = torch.Generator().manual_seed(seed)
    B, N, h, w, P = 2, 3, 16, 20, 3
    fmap = torch.randn(B, N, C, h, w, generator=g, dtype=torch.float64, requires_grad=requires_grad)
    pf = torch.randn(B, 5, C, P, P, generator=g, dtype=torch.float64, requires_grad=requires_grad)
    jj = torch.randint(0, N, (E,), generator=g)
    kk = torch.randint(0, 5, (E,), generator=g)
    centre = torch.rand(B, E, 2, generator=g, dtype=torch.float64) * torch.tensor([w + 6.0, h + 6.0]) - 3.0
    off = torch.arange(-1, 2, dtype=torch.float64)
    coords = torch.stack(torch.broadcast_tensors(centre[..., None, None, 0] + 1.1 * off.view(1, 1, 1, -1),
                                                 centre[..., None, None, 1] + 0.9 * off.view(1, 1, -1, 1)), dim=-1)
    return fmap, pf, coords, jj, kk


def test_corr_lookup_equals_full_map_sampling():
    B, E, P, R = 2, 7, 3, 3
    fmap, patch_features, coords, jj, kk = _corr_problem(0, C=8, E=E)
    block = CorrBlock(fmap, patch_features, radius=R, levels=(1, 4))
    got = block(coords, jj, kk)
    assert got.shape == (B, E, block.feature_dim)
    per_level = P * P * (2 * R + 1) ** 2
    for idx, level in enumerate((1, 4)):
        want = naive_lookup(fmap, patch_features, coords, jj, kk, R, level)
        assert torch.allclose(got[..., idx * per_level:(idx + 1) * per_level], want, atol=1e-10), level


def test_corr_gradients_match_naive():
    g = torch.Generator().manual_seed(1)
    fmap = torch.randn(1, 2, 4, 12, 12, generator=g, dtype=torch.float64, requires_grad=True)
    pf = torch.randn(1, 2, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    jj, kk = torch.tensor([1, 0]), torch.tensor([0, 1])
    coords = (3 + 6 * torch.rand(1, 2, 1, 1, 2, generator=g, dtype=torch.float64)) + torch.stack(
        torch.broadcast_tensors(torch.arange(-1.0, 2).view(1, 1, 1, 3), torch.arange(-1.0, 2).view(1, 1, 3, 1)),
        dim=-1).double()
    a = CorrBlock(fmap, pf, 2, (1,))(coords, jj, kk)
    b = naive_lookup(fmap, pf, coords, jj, kk, 2, 1)
    w = torch.randn_like(a)
    ga = torch.autograd.grad((a * w).sum(), (fmap, pf))
    gb = torch.autograd.grad((b * w).sum(), (fmap, pf))
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, atol=1e-10)


def test_clip_graph_edges_and_neighbours():
    patch_frame = torch.tensor([0, 0, 1, 2])
    graph = clip_graph(patch_frame, 3)
    edges = set(zip(graph.kk.tolist(), graph.jj.tolist()))
    assert edges == {(k, j) for k in range(4) for j in range(3) if j != int(patch_frame[k])}
    assert torch.equal(graph.ii, patch_frame[graph.kk])
    for e in range(len(graph)):
        k, j = int(graph.kk[e]), int(graph.jj[e])
        for nb, want_j in ((graph.prev_edge[e], j - 1), (graph.next_edge[e], j + 1)):
            if (k, want_j) in edges:
                assert int(graph.kk[nb]) == k and int(graph.jj[nb]) == want_j
            else:
                assert int(nb) == -1
    pairs = {}
    for e in range(len(graph)):
        key = (int(graph.ii[e]), int(graph.jj[e]))
        pairs.setdefault(key, set()).add(int(graph.frame_pair[e]))
    assert all(len(v) == 1 for v in pairs.values()) and len({next(iter(v)) for v in pairs.values()}) == len(pairs)
    near = clip_graph(torch.arange(5), 5, max_frame_gap=1)
    assert int((near.ii - near.jj).abs().max()) == 1


def test_patches_gather_the_right_pixels():
    g = torch.Generator().manual_seed(2)
    fmap = torch.randn(2, 3, 5, 10, 12, generator=g)
    centres = select_centres(3, 4, 10, 12, 3, generator=g)
    assert int(centres[..., 0].min()) >= 1 and int(centres[..., 0].max()) <= 10
    patches = gather_patches(fmap, centres, 3)
    for n in range(3):
        for q in range(4):
            x, y = centres[n, q].tolist()
            assert torch.equal(patches[:, n * 4 + q], fmap[:, n, :, y - 1:y + 2, x - 1:x + 2])
    grid = patch_grid(centres, 3, torch.full((2, 12), 0.5))
    assert torch.equal(grid[0, 5, 0, 1, 1], centres[1, 1, 0].float())
    assert torch.equal(grid[0, 5, 1, 0, 1], centres[1, 1, 1].float() - 1)
    # gradient-biased selection keeps the strongest candidates
    score = torch.zeros(3, 10, 12)
    score[:, 4, 6] = 1.0
    biased = select_centres(3, 1, 10, 12, 3, score=score, generator=torch.Generator().manual_seed(0))
    plain = select_centres(3, 3, 10, 12, 3, generator=torch.Generator().manual_seed(0))
    hit = (plain[..., 0] == 6) & (plain[..., 1] == 4)
    assert torch.equal(hit.any(1), (biased[:, 0, 0] == 6) & (biased[:, 0, 1] == 4))


def test_soft_aggregate_equals_loop():
    torch.manual_seed(0)
    agg = SoftAggregate(6).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    group = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2, 1])
    got = agg(x, group, 3)
    for b in range(2):
        for e in range(9):
            members = x[b, group == group[e]]
            a = torch.softmax(agg.g(members), dim=0)
            want = agg.h((a * agg.f(members)).sum(0))
            assert torch.allclose(got[b, e], want, atol=1e-12)


def test_gradient_clamp_clamps_and_keeps_nan_visible():
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    y = GradientClamp(0.5)(x)
    y.backward(torch.tensor([2.0, -0.1, float("nan")]))
    assert x.grad[0] == 0.5 and x.grad[1] == -0.1 and torch.isnan(x.grad[2])


def test_all_pairs_volume_equals_windowed_lookup_values_and_gradients():
    R = 3
    fmap, pf, coords, jj, kk = _corr_problem(4, C=6, E=9, requires_grad=True)
    a = CorrBlock(fmap, pf, R, (1, 4))(coords, jj, kk)
    b = AllPairsCorrBlock(fmap, pf, R, (1, 4))(coords, jj, kk)
    assert torch.allclose(a, b, atol=1e-10)
    wgt = torch.randn_like(a)
    ga = torch.autograd.grad((a * wgt).sum(), (fmap, pf))
    gb = torch.autograd.grad((b * wgt).sum(), (fmap, pf))
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, atol=1e-10)
