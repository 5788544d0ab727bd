"""Network parts against plain reference computations: correlation lookup, graph, patches, blocks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vo.model import correlation
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
    assert edges == {(k, j) for k in range(4) for j in range(3)}           # self-edges (j == ii) included
    assert torch.equal(graph.ii, patch_frame[graph.kk])
    _assert_sorted_neighbours(graph)
    pairs = {}
    for e in range(len(graph)):
        key = (int(graph.ii[e]), int(graph.jj[e]))
        pairs.setdefault(key, set()).add(int(graph.frame_pair[e]))
    assert all(len(v) == 1 for v in pairs.values()) and len({next(iter(v)) for v in pairs.values()}) == len(pairs)
    near = clip_graph(torch.arange(5), 5, max_frame_gap=1)
    assert int((near.ii - near.jj).abs().max()) == 1
    no_self = clip_graph(patch_frame, 3, self_edges=False)
    assert bool((no_self.ii != no_self.jj).all()) and len(no_self) == 4 * 2
    # without its self-edge, patch 2 (frame 1) has edges into frames 0 and 2 only: they are neighbours (DPVO's
    # sorted order), where a look-up of exactly jj -+ 1 would leave both without one
    e0 = int(((no_self.kk == 2) & (no_self.jj == 0)).nonzero())
    e2 = int(((no_self.kk == 2) & (no_self.jj == 2)).nonzero())
    assert int(no_self.next_edge[e0]) == e2 and int(no_self.prev_edge[e2]) == e0
    _assert_sorted_neighbours(no_self)


def _assert_sorted_neighbours(graph):
    """prev/next edge: the edge of the same patch into the nearest earlier/later target frame present, or -1."""
    for e in range(len(graph)):
        k, j = int(graph.kk[e]), int(graph.jj[e])
        targets = sorted(int(t) for t in graph.jj[graph.kk == k])
        before, after = [t for t in targets if t < j], [t for t in targets if t > j]
        for nb, want in ((graph.prev_edge[e], before[-1] if before else None),
                         (graph.next_edge[e], after[0] if after else None)):
            if want is None:
                assert int(nb) == -1
            else:
                assert int(graph.kk[nb]) == k and int(graph.jj[nb]) == want


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


def _lookup_and_gradients(block_args, coords, jj, kk, inputs, seed=5, **kw):
    """Features of a CorrBlock lookup and the gradients of a random weighting of them w.r.t. ``inputs``."""
    out = CorrBlock(*block_args, **kw)(coords, jj, kk)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return out, torch.autograd.grad((out * weights).sum(), inputs)


def test_recomputing_backward_equals_autograd_through_the_saved_window():
    """WindowCorrelation (window recomputed in backward) against plain autograd through window_correlation (window
    saved): values and the gradients w.r.t. feature maps, patch features and reprojections, float64."""
    R = 3
    fmap, pf, coords, jj, kk = _corr_problem(6, C=6, E=11, requires_grad=True)
    coords.requires_grad_(True)
    saved, g_saved = _lookup_and_gradients((fmap, pf, R, (1, 4)), coords, jj, kk, (fmap, pf, coords), recompute=False)
    ours, g_ours = _lookup_and_gradients((fmap, pf, R, (1, 4)), coords, jj, kk, (fmap, pf, coords), recompute=True)
    assert torch.allclose(ours, saved, atol=1e-12)
    for name, a, b in zip(("fmap", "patch features", "coords"), g_ours, g_saved):
        assert b.abs().max() > 1e-3, name                                   # not comparing zeros
        assert torch.allclose(a, b, atol=1e-10), name


def test_recomputing_backward_in_chunks_equals_one_chunk(monkeypatch):
    """Edges split into several chunks of windows (a tiny WINDOW_CHUNK_NUMBERS) give the one-chunk numbers."""
    fmap, pf, coords, jj, kk = _corr_problem(7, C=4, E=10, requires_grad=True)
    coords.requires_grad_(True)
    whole, g_whole = _lookup_and_gradients((fmap, pf, 2, (1, 2)), coords, jj, kk, (fmap, pf, coords))
    S = correlation.window_side(2, 3)
    monkeypatch.setattr(correlation, "WINDOW_CHUNK_NUMBERS", 3 * S * S * 4)          # 3 edges per chunk
    assert len(correlation._edge_chunks(2 * 10, S * S * 4)) == 7
    chunked, g_chunked = _lookup_and_gradients((fmap, pf, 2, (1, 2)), coords, jj, kk, (fmap, pf, coords))
    assert torch.allclose(chunked, whole, atol=1e-12)
    for a, b in zip(g_chunked, g_whole):
        assert torch.allclose(a, b, atol=1e-12)


def test_recomputing_backward_gradcheck():
    """Finite differences through WindowCorrelation on a tiny problem: feature table, patch features, coords."""
    g = torch.Generator().manual_seed(8)
    fmap = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)                 # 2 frames, C=3, 5x6
    table = correlation.feature_table(fmap).requires_grad_(True)
    pf = torch.randn(3, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    centre = torch.tensor([[2.3, 1.6], [4.7, 3.2], [-0.4, 2.9], [5.6, 4.4]], dtype=torch.float64)
    off = torch.stack(torch.meshgrid(torch.arange(-1.0, 2.0), torch.arange(-1.0, 2.0), indexing="xy"), -1)
    coords = (centre[:, None, None] + 1.05 * off.double()).requires_grad_(True)   # one edge partly outside
    target, patch = torch.tensor([1, 0, 1, 0]), torch.tensor([0, 2, 1, 2])

    def lookup(table, pf, coords):
        return correlation.WindowCorrelation.apply(table, pf, coords, target, patch, (5, 6), 1)

    assert lookup(table, pf, coords).abs().max() > 0.1
    assert torch.autograd.gradcheck(lookup, (table, pf, coords), eps=1e-6, atol=1e-7)


def test_network_gradients_equal_with_windowed_and_all_pairs_correlation():
    """A VONet step (exact gradients: reprojections not detached, so the lookups' coordinate gradients count) gives
    the same loss and parameter gradients with the windowed lookup (recomputing backward) as with the volume."""
    from vo.model.network import VONet

    g = torch.Generator().manual_seed(9)
    images = F.interpolate(torch.rand(3, 3, 8, 12, generator=g), size=(32, 48), mode="bilinear").double()[None]
    intrinsics = torch.tensor([24.0, 24.0, 23.5, 15.5], dtype=torch.float64).expand(1, 3, 4)
    model = dict(dim=16, feature_dim=8, encoder_width=8, patches_per_frame=4, corr_radius=2, corr_levels=[1, 2],
                 gradient_bias=False, head_grad_clamp=0.0, detach_between_updates=False)
    results = []
    for impl in ("windowed", "all_pairs"):
        torch.manual_seed(0)
        net = VONet({**model, "corr_impl": impl}, dict(iterations=1)).double()
        out = net(images, intrinsics, iters=2, generator=torch.Generator().manual_seed(3))
        loss = sum((s.coords ** 2).mean() + s.weights.mean() for s in out.steps)
        grads = torch.autograd.grad(loss, list(net.parameters()))
        results.append((loss.detach(), grads))
    (loss_w, grads_w), (loss_a, grads_a) = results
    assert torch.allclose(loss_w, loss_a, rtol=1e-10)
    assert grads_w[0].abs().max() > 0                                # the matching encoder's first layer
    for a, b in zip(grads_w, grads_a):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-10)
