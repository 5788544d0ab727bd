"""The streaming VO runner (vo/streaming/runner.py and the files it uses).

* a perfect "network" (ground-truth correspondences, unit weights) on a synthetic
  sequence with exact ground truth recovers the trajectory to ATE < 1 % of the path
  length: the runner, the keyframe window, the BA and the metric wiring are right;
* memory is constant in the sequence length: the window's frames, patches, edges,
  hidden states and buffers stay within their bounds while frames keep arriving and
  leaving, and every frame still gets a pose;
* a sequence too short to initialise, or without motion, is an error that says how
  many frames are needed;
* the parts: the streaming correlation equals ``CorrBlock``; the pose history composes
  relative poses and interpolates skipped frames; the keyframe flow test separates
  rotation from translation; the float32 SE(3) log/exp at small angles (a fix to
  ``ba_layer/lie.py`` found by the runner).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ba_layer import lie
from vo.eval import metrics
from vo.eval.trained_model import load_model, random_checkpoint, streaming_config_for
from vo.model.correlation import CorrBlock
from vo.streaming.keyframes import flow_magnitude
from vo.streaming.lookup import correlation
from vo.streaming.oracle import OracleCorrespondences
from vo.streaming.pose_history import PoseHistory
from vo.streaming.runner import NotInitialisedError, StreamingConfig, StreamingVO, run_sequence
from vo.streaming.sources import LearnedCorrespondences
from vo.streaming.window import WindowProblem

SYNTHETIC_FRAMES = 60
#: The oracle's Sim(3)-aligned ATE must be below this fraction of the path length (the issue's bound).
ORACLE_MAX_RELATIVE_ATE = 0.01
#: A tiny network for runs that need the learned source's bookkeeping, not its accuracy.
TINY_MODEL = {"dim": 16, "feature_dim": 16, "encoder_width": 8, "patches_per_frame": 8}
#: A small window, no redundancy removal: frames leave the window by age only.
SLIDING = dict(removal_window=6, optimization_window=4, edge_span=3, init_frames=5, keyframe_index=2,
               keyframe_flow_px=0.0, init_min_flow_px=0.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def synthetic_sequence(tmp_path_factory):
    """One 60-frame trajectory at 160x120 of the embedded synthetic generator (exact depth and poses)."""
    synthetic = pytest.importorskip("veracity_datasets.synthetic")
    from veracity_datasets.tartanair import TartanAirSequence, find_tartanair_sequences

    out = tmp_path_factory.mktemp("synthetic_streaming") / "data"
    config = synthetic.SyntheticConfig(image_size=(120, 160), frames=SYNTHETIC_FRAMES, train_scenes=1,
                                       train_trajectories=1, test_scenes=0, seed=0)
    synthetic.generate(out, config, splits=("train",), workers=1)
    return TartanAirSequence(find_tartanair_sequences(out)[0])


def _path_length(T_wc: np.ndarray) -> float:
    return float(np.linalg.norm(np.diff(T_wc[:, :3], axis=0), axis=1).sum())


# ------------------------------------------------------------------ the perfect network
@pytest.mark.parametrize("ba", [dict(ba_adaptive=False, ba_pose_damping_focal2=0.025),
                                dict(ba_adaptive=True, ba_pose_damping_focal2=0.0)],
                         ids=["fixed_steps_as_the_network", "adaptive_lm"])
def test_oracle_recovers_the_trajectory(synthetic_sequence, ba):
    seq = synthetic_sequence
    gt = seq.poses.numpy()
    result = run_sequence(seq, OracleCorrespondences(seq.poses, seq.depth), StreamingConfig(**ba))
    path = _path_length(gt)
    ate = metrics.ate(result.timestamps, result.T_wc, seq.timestamps, gt, align="sim3")
    records = result.stats["pose_records"]
    print(f"\noracle streaming VO, synthetic 160x120 x {len(seq)}: ATE {ate['rmse']:.5f} m over {path:.2f} m "
          f"({100 * ate['rmse'] / path:.4f} %), pose records {records}, "
          f"{result.stats['fps']:.1f} FPS, stages ms/frame {result.stats['stage_ms_per_frame']}")
    assert result.T_wc.shape == (len(seq), 7) and np.isfinite(result.T_wc).all()
    assert np.allclose(result.timestamps, seq.timestamps)
    assert ate["n"] == len(seq)
    assert ate["rmse"] < ORACLE_MAX_RELATIVE_ATE * path
    # every way a frame gets its pose was exercised: final in the window, relative to a keyframe, interpolated
    assert records["absolute"] > 0 and records["relative"] > 0 and records["interpolated"] > 0
    assert result.stats["ba_failed"] == 0
    # the bound discriminates: a trajectory that stays at the start would fail it
    still = np.tile(lie.identity(1, dtype=torch.float64).numpy(), (len(seq), 1))
    still[:, :3] = np.random.default_rng(0).normal(0.0, 1e-3, (len(seq), 3))   # not degenerate for Umeyama
    assert metrics.ate(seq.timestamps, still, seq.timestamps, gt)["rmse"] > ORACLE_MAX_RELATIVE_ATE * path


# ------------------------------------------------------------------ bounded memory, every frame posed
def _run_recording_sizes(seq, source, config):
    vo = StreamingVO(source, seq.intrinsics, config)
    sizes = []
    for i in range(len(seq)):
        vo.track(seq.image(i), seq.timestamps[i])
        w = vo.window
        hidden = None if w.hidden is None else int(w.hidden.shape[1])
        sizes.append((len(w), w.n_edges, w.n_patches, hidden, w.state_bytes() + source.state_bytes(),
                      w.state_bytes(), source.state_bytes()))
    return vo, np.array([[np.nan if v is None else v for v in s] for s in sizes], dtype=np.float64)


def _assert_bounded(vo, sizes, config, n_frames):
    p = vo.p
    frames, edges, patches, hidden, state, window_bytes, source_bytes = sizes.T
    # fixed-size buffers: the source's never change after the first frame, the window's grow only with its edges
    per_edge = 3 * 8 + (vo.window.state_dim + 4) * 4           # slots and patch (int64), hidden, target, weight
    assert np.all(source_bytes == source_bytes[0])
    assert np.all(window_bytes - edges * per_edge == window_bytes[0] - edges[0] * per_edge)
    assert frames.max() <= config.max_frames
    assert patches.max() <= config.max_frames * p
    assert edges.max() <= config.max_edges(p)
    half = n_frames // 2
    # constant in the sequence length: the second half never needs more than the first
    for column in (frames, edges, patches, state):
        assert column[half:].max() <= column[:half].max()
    assert vo.counts["frames_left_window"] >= n_frames - config.max_frames
    T = vo.poses()
    assert T.shape == (n_frames, 7) and np.isfinite(T).all()
    assert np.allclose(np.linalg.norm(T[:, 3:], axis=1), 1.0, atol=1e-6)


def test_window_memory_is_bounded_and_every_frame_posed_oracle(synthetic_sequence):
    seq = synthetic_sequence
    config = StreamingConfig(**SLIDING)
    vo, sizes = _run_recording_sizes(seq, OracleCorrespondences(seq.poses, seq.depth), config)
    print(f"\noracle, window of {config.removal_window}: max frames {int(sizes[:, 0].max())}, edges "
          f"{int(sizes[:, 1].max())} (bound {config.max_edges(vo.p)}), state {sizes[:, 4].max() / 1e3:.1f} kB")
    _assert_bounded(vo, sizes, config, len(seq))
    assert vo.counts["redundant_keyframes_removed"] == 0              # frames left by age only
    gt = seq.poses.numpy()
    ate = metrics.ate(vo.timestamps, vo.poses(), seq.timestamps, gt)
    assert ate["rmse"] < ORACLE_MAX_RELATIVE_ATE * _path_length(gt)


def test_window_memory_is_bounded_learned(synthetic_sequence, tmp_path):
    """The learned source's slot buffers and the per-edge hidden states follow the window."""
    net, _ = load_model(random_checkpoint(tmp_path / "tiny.pt", TINY_MODEL))
    config = streaming_config_for(net, **SLIDING)
    source = LearnedCorrespondences(net)
    vo, sizes = _run_recording_sizes(synthetic_sequence, source, config)
    _assert_bounded(vo, sizes, config, len(synthetic_sequence))
    edges, hidden = sizes[:, 1], sizes[:, 3]
    assert np.array_equal(edges, hidden)                               # one hidden state per edge, always
    assert source.state_bytes() > 0 and vo.window.state_dim == net.cfg.dim


# ------------------------------------------------------------------ the learned source is the trained forward
def test_streaming_initialisation_equals_the_network_forward(synthetic_sequence, tmp_path):
    """With the clip's frames, patches and initial depths, the streaming VO's initialisation (every patch to
    every frame, ``init_updates`` updates) computes what ``VONet.forward`` computes on the clip in training:
    the slot buffers, the streaming correlation, the per-edge hidden state, the graph and the BA are wired as
    the network was trained (``model.schedule: all_pairs``: every frame connected from the first update)."""
    net, _ = load_model(random_checkpoint(tmp_path / "tiny.pt", {**TINY_MODEL, "schedule": "all_pairs"}))
    net = net.double()
    seq, N, iters = synthetic_sequence, 5, 3
    images = torch.stack([seq.image(i) for i in range(N)]).double()
    K = seq.intrinsics.double().expand(N, 4)
    g = torch.Generator().manual_seed(0)
    d0 = net.initial_inverse_depth(1, N * net.cfg.patches_per_frame, images, g)
    with torch.no_grad():
        out = net(images[None], K[None], iters=iters, inverse_depth_init=d0, generator=g)
    p = net.cfg.patches_per_frame

    class Injected(StreamingVO):                     # the clip's patch centres and initial depths
        def _select_centres(self, image):
            return out.centres[0, self.counts["frames"] - 1]       # (B, N, p, 2): clip 0

        def _initial_inverse_depth(self):
            k = self.counts["frames"] - 1
            return d0[0, k * p:(k + 1) * p]

    config = streaming_config_for(net, init_frames=N, edge_span=N - 1, init_updates=iters, init_min_flow_px=0.0)
    vo = Injected(LearnedCorrespondences(net), seq.intrinsics, config, dtype=torch.float64)
    for i in range(N):
        vo.track(images[i], seq.timestamps[i])
    assert vo.initialised and vo.counts["updates"] == iters and vo.window.n_edges == len(out.graph)
    T = torch.stack([vo.window.pose(k) for k in range(N)])
    d = vo.window.inverse_depth[vo.window.order].reshape(-1)
    moved = (out.final.T_wc[0, 1:, :3] - out.steps[0].T_wc[0, 1:, :3]).abs().max()
    assert moved > 1e-4                                                   # the updates did something
    assert torch.allclose(T, out.final.T_wc[0], atol=1e-9)
    assert torch.allclose(d, out.final.inverse_depth[0], atol=1e-9)


def test_streaming_steady_state_equals_the_network_forward(synthetic_sequence, tmp_path):
    """Train like it runs: with the clip's frames, patches and initial depths, the streaming VO after several
    insertions (one frame and one update at a time, DPVO's scheme: the previous pose, the median depth of
    the previous two frames, zero hidden state for the new edges, self-edges) computes what ``VONet.forward``
    computes with ``model.schedule: dpvo`` on the clip in training, update after update."""
    n_init, init_updates, N = 4, 3, 8
    model = {**TINY_MODEL, "schedule": "dpvo", "init_frames": n_init, "init_updates": init_updates,
             "drop_probability": 0.0}
    net, _ = load_model(random_checkpoint(tmp_path / "tiny.pt", model))
    net = net.double()
    with torch.no_grad():                # small flow revisions: the depths stay off the BA's floor, so the new
        for x in net.update.flow_head[1].parameters():    # frames' median depths differ from frame to frame
            x.mul_(FLOW_HEAD_SHRINK)
    iters = init_updates + N - n_init                # one update per joining frame, as the runner
    seq = synthetic_sequence
    images = torch.stack([seq.image(i) for i in range(N)]).double()
    K = seq.intrinsics.double().expand(N, 4)
    g = torch.Generator().manual_seed(0)
    d0 = net.initial_inverse_depth(1, N * net.cfg.patches_per_frame, images, g)
    T0 = seq.poses[:N].double()                    # the true poses of the first frames: a well-posed BA
    with torch.no_grad():
        out = net(images[None], K[None], iters=iters, T_wc_init=T0[None], inverse_depth_init=d0, generator=g)
    assert [s.n_frames for s in out.steps] == [n_init] * init_updates + list(range(n_init + 1, N + 1))
    p = net.cfg.patches_per_frame

    class Injected(StreamingVO):                     # the clip's patch centres and initial depths
        def _select_centres(self, image):
            return out.centres[0, self.counts["frames"] - 1]       # (B, N, p, 2): clip 0

        def _initial_inverse_depth(self):
            k = self.counts["frames"] - 1
            return d0[0, k * p:(k + 1) * p] if k < n_init else super()._initial_inverse_depth()

        def _initial_pose(self):
            k = self.counts["frames"] - 1
            return T0[k] if k < n_init else super()._initial_pose()

    config = streaming_config_for(net, init_frames=n_init, edge_span=N, init_updates=init_updates,
                                  init_min_flow_px=0.0, removal_window=N + 1, optimization_window=N + 1,
                                  keyframe_flow_px=0.0, motion_damping=0.0, depth_median_frames=2)
    vo = Injected(LearnedCorrespondences(net), seq.intrinsics, config, dtype=torch.float64)
    for i in range(N):
        vo.track(images[i], seq.timestamps[i])
        step = out.steps[vo.counts["updates"] - 1] if vo.initialised else None
        if step is None:
            continue
        n = len(vo.window)
        assert n == step.n_frames and vo.window.n_edges == int(step.active.sum()) if step.active is not None \
            else vo.window.n_edges == len(out.graph)
        T = torch.stack([vo.window.pose(k) for k in range(n)])
        d = vo.window.inverse_depth[vo.window.order].reshape(-1)
        assert torch.allclose(T, step.T_wc[0, :n], atol=1e-9), f"poses differ after frame {i}"
        assert torch.allclose(d, step.inverse_depth[0, :n * p], atol=1e-9), f"depths differ after frame {i}"
    assert vo.counts["updates"] == iters and len(vo.window) == N
    moved = (out.final.T_wc[0, n_init:, :3] - out.steps[init_updates].T_wc[0, n_init - 1, :3]).abs().max()
    assert moved > 1e-4                                               # the inserted frames moved off their start


#: The steady-state test scales the random network's flow head by this (a random head's revisions of several
#: pixels drive every inverse depth to the BA's floor, where the median depths could not tell a mistake).
FLOW_HEAD_SHRINK = 0.05


# ------------------------------------------------------------------ errors
class _Frames:
    """A sequence-like object over a list of images."""

    def __init__(self, images, intrinsics, timestamps, name="frames"):
        self.images, self.intrinsics, self.timestamps, self.name = images, intrinsics, timestamps, name

    def __len__(self):
        return len(self.images)

    def image(self, i):
        return self.images[i]


def test_too_short_sequence_says_how_many_frames_it_needs(synthetic_sequence):
    seq = synthetic_sequence
    short = _Frames([seq.image(i) for i in range(5)], seq.intrinsics, seq.timestamps[:5], "short")
    with pytest.raises(NotInitialisedError, match="'short' has 5 frame.*needs at least 8"):
        run_sequence(short, OracleCorrespondences(seq.poses, seq.depth), StreamingConfig())
    # enough frames but no motion: every frame after the first is skipped by the motion check
    n = 10
    still = OracleCorrespondences(seq.poses[:1].repeat(n, 1), lambda i: seq.depth(0))
    vo = StreamingVO(still, seq.intrinsics, StreamingConfig())
    for i in range(n):
        vo.track(seq.image(0), seq.timestamps[i])
    with pytest.raises(NotInitialisedError, match="needs 8 frames.*given 10 frame.*of which 1 moved enough"):
        vo.poses()
    # the skipping is limited: after init_max_skipped_frames skips every frame is kept, and the VO initialises
    vo = StreamingVO(still, seq.intrinsics, StreamingConfig(init_max_skipped_frames=2))
    for i in range(n):
        vo.track(seq.image(0), seq.timestamps[i])
    assert vo.counts["skipped_before_init"] == 2 and vo.initialised and np.isfinite(vo.poses()).all()
    with pytest.raises(ValueError, match="strictly increasing"):
        vo.track(seq.image(0), seq.timestamps[0])
    with pytest.raises(ValueError, match="init_frames"):
        StreamingConfig(init_frames=12, removal_window=10)


# ------------------------------------------------------------------ the parts
def _corr_inputs(h, w, E, n_frames=5, C=16, P=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    fmap = torch.randn(1, n_frames, C, h, w, generator=g)
    patch_features = torch.randn(1, n_frames * 4, C, P, P, generator=g)
    centre = torch.rand(1, E, 1, 1, 2, generator=g) * torch.tensor([w + 8.0, h + 8.0]) - 4.0   # some outside
    offsets = torch.stack(torch.meshgrid(torch.arange(-1.0, 2.0), torch.arange(-1.0, 2.0), indexing="xy"), -1)
    coords = centre + 1.1 * offsets + 0.2 * torch.randn(1, E, P, P, 2, generator=g)
    jj = torch.randint(0, n_frames, (E,), generator=g)
    kk = torch.randint(0, n_frames * 4, (E,), generator=g)
    return fmap, patch_features, coords, jj, kk


@pytest.mark.parametrize("size", [(60, 80), (30, 40), (9, 12)])
def test_streaming_correlation_equals_corrblock(size):
    """Both ways of vo.streaming.lookup (windows of rows; whole small maps) give CorrBlock's numbers."""
    levels, radius = (1, 4), 3
    fmap, pf, coords, jj, kk = _corr_inputs(*size, E=150)
    reference = CorrBlock(fmap, pf, radius, levels)(coords, jj, kk)
    tables, sizes = [], []
    for s in levels:
        f = fmap[0] if s == 1 else F.avg_pool2d(fmap[0], s, s)
        sizes.append(tuple(f.shape[-2:]))
        tables.append(torch.cat([f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]), f.new_zeros(1, f.shape[1])]))
    ours = correlation(tables, sizes, levels, pf, coords, jj, kk, radius)
    assert ours.shape == reference.shape
    assert reference.abs().max() > 1.0                                   # not comparing zeros
    assert torch.allclose(ours, reference, atol=1e-5, rtol=1e-5)
    workspace = {}                                                       # reused buffers: the same numbers,
    correlation(tables, sizes, levels, pf, coords[:, :40], jj[:40], kk[:40], radius, workspace)   # grown once
    reused = correlation(tables, sizes, levels, pf, coords, jj, kk, radius, workspace)
    assert workspace and torch.equal(reused, ours)


def test_pose_history_composes_and_interpolates():
    T = lie.random_SE3(4, generator=torch.Generator().manual_seed(3)).double()
    rel = lie.random_SE3(generator=torch.Generator().manual_seed(4)).double()
    h = PoseHistory()
    for t in (0.0, 0.1, 0.2, 0.4):
        h.new_frame(t)
    h.set_absolute(0, T[0])
    h.set_relative(1, 0, rel)
    h.set_interpolated(2)                       # between frame 1 (t = 0.1) and frame 3 (t = 0.4): s = 1/3
    h.set_absolute(3, T[3])
    out = torch.from_numpy(h.resolve())
    T1 = lie.compose(T[0], rel)
    assert torch.allclose(out[1], T1, atol=1e-12)
    assert torch.allclose(out[2, :3], T1[:3] + (T[3, :3] - T1[:3]) / 3, atol=1e-12)
    angle_13 = lie.rotation_angle(lie.compose(lie.inverse(T1), T[3]))
    angle_12 = lie.rotation_angle(lie.compose(lie.inverse(T1), out[2]))
    angle_23 = lie.rotation_angle(lie.compose(lie.inverse(out[2]), T[3]))
    assert float(angle_13) > 0.1
    assert torch.allclose(angle_12, angle_13 / 3, atol=1e-9) and torch.allclose(angle_23, 2 * angle_13 / 3, atol=1e-9)
    assert h.counts() == {"absolute": 2, "relative": 1, "interpolated": 1}
    with pytest.raises(ValueError, match="earlier reference"):
        h.set_relative(1, 2, rel)


def _two_view_problem(T_wc_j: torch.Tensor, inverse_depth: float = 0.5) -> WindowProblem:
    K = torch.tensor([[[100.0, 100.0, 50.0, 40.0]] * 2], dtype=torch.float64)
    patches = torch.zeros(1, 1, 3, 1, 1, dtype=torch.float64)
    patches[0, 0, :, 0, 0] = torch.tensor([50.0, 40.0, inverse_depth])         # on the optical axis
    T = torch.stack([lie.identity(dtype=torch.float64), T_wc_j])[None]
    zero, one = torch.tensor([0]), torch.tensor([1])
    return WindowProblem(T_wc=T, patches=patches, intrinsics=K, ii=zero, jj=one, kk=zero, slots=torch.arange(2),
                         source_slot=zero, target_slot=one, patch_slot=zero)


def test_keyframe_flow_separates_rotation_from_translation():
    angle = 0.05
    turn = lie.exp(torch.tensor([0, 0, 0, 0, angle, 0], dtype=torch.float64))          # about the y axis
    full = flow_magnitude(_two_view_problem(turn), beta=1.0)
    assert float(full) == pytest.approx(100.0 * np.tan(angle), rel=1e-9)               # fx tan(angle)
    assert float(flow_magnitude(_two_view_problem(turn), beta=0.0)) == pytest.approx(0.0, abs=1e-9)
    step = lie.exp(torch.tensor([0.2, 0, 0, 0, 0, 0], dtype=torch.float64))            # 0.2 to the right
    for beta in (0.0, 0.5, 1.0):                                                        # fx * t * d
        assert float(flow_magnitude(_two_view_problem(step), beta)) == pytest.approx(100.0 * 0.2 * 0.5, rel=1e-9)


def test_se3_log_exp_float32_small_angles_are_finite():
    """lie.log once divided by 1 - cos(t), which rounds to 0 in float32 for t ~ 1e-4 (NaN poses in the runner)."""
    angles = torch.tensor([2e-5, 1e-4, 2.6e-4, 1e-3, 1e-2, 0.1], dtype=torch.float64)
    axis = torch.tensor([0.3, 0.8, -0.5], dtype=torch.float64)
    xi = torch.cat([torch.tensor([[0.4, -0.2, 0.9]], dtype=torch.float64).expand(len(angles), 3),
                    angles[:, None] * axis / axis.norm()], dim=1)
    T64 = lie.exp(xi)
    back32 = lie.log(T64.float())
    assert torch.isfinite(back32).all() and torch.isfinite(lie.exp(xi.float())).all()
    assert torch.allclose(back32.double(), xi, atol=2e-6)
    assert torch.allclose(lie.exp(xi.float()).double(), T64, atol=2e-6)
