"""Correlation lookup: how well each patch matches the target frame around its current reprojection.

For an edge (patch ``k``, target frame ``j``) and each of the patch's ``P x P``
pixels, the lookup returns the correlation between that pixel's matching
feature and the target frame's feature map at the ``(2R+1) x (2R+1)`` grid of
positions centred on the pixel's reprojection, bilinearly interpolated with
zero outside the map, at each pyramid level.

Two ways compute these numbers, on one core:

* :class:`CorrBlock` (and the streaming lookup, :mod:`vo.streaming.lookup`):
  per edge, the target features of an ``S x S`` integer window around the
  reprojected patch centre are gathered, correlated with the patch's features
  by one batched matrix product, and sampled (:func:`sample_window`).  Memory
  and time grow with the number of edges, not with the image size.  Its
  backward recomputes the window instead of saving it
  (:class:`WindowCorrelation`).
* :class:`AllPairsCorrBlock`: from a volume of every patch pixel against
  every position of every frame, computed once per clip; a lookup gathers a
  ``(2R+2) x (2R+2)`` integer window of that volume per pixel and blends it.

The core both use: :func:`window_origin` and :func:`window_index` place an
integer window and say which of its positions lie in the map (outside ones
read zero); :func:`bilinear_taps` blends the ``(2R+2)^2`` integer positions
around a point into its ``(2R+1)^2`` bilinear samples, and
:func:`sample_window` does both for a point in a window of values;
:func:`window_correlation` is the windowed lookup for a set of edges.
Feature maps enter it as a *table* of rows ``(frame, y, x)`` of channels with
a last row of zeros (:func:`feature_table`), which is also how the streaming
VO stores them.

Sample order in a feature: pixel row ``py``, pixel column ``px``, offset row
``dy``, offset column ``dx`` (``x`` right, ``y`` down, feature pixels).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

#: Reprojections are clamped to this many pixels before windows are placed (finite integer window origins).
COORD_CLAMP_PX = 1e4
#: :class:`WindowCorrelation` gathers the windows of at most this many numbers at once (edges in chunks):
#: 2^25 float32 numbers are 128 MB, transient, whatever the number of edges.
WINDOW_CHUNK_NUMBERS = 1 << 25

#: ``buffer(name, shape, like)``: where an intermediate goes (``like``'s dtype and device), or None for fresh ones.
BufferFn = Optional[Callable[[str, tuple, torch.Tensor], torch.Tensor]]


# ---------------------------------------------------------------------------------------------- the core
def window_side(radius: int, patch_size: int) -> int:
    """``S``: side of the integer window around a patch centre that holds every bilinear sample of every pixel of
    the patch (one position to spare on each side for a patch that perspective has stretched)."""
    return 2 * (radius + patch_size // 2 + 1) + 2


def window_origin(centre: torch.Tensor, half: int) -> torch.Tensor:
    """(..., 2) int64 top-left ``(x, y)`` of the window placed around ``centre`` (..., 2): ``floor(centre) - half``.

    Not differentiable (a window only has to contain the samples); NaN and far-away centres are clamped to
    :data:`COORD_CLAMP_PX` so that the origin is a finite integer (their samples then fall outside the map).
    """
    c = torch.nan_to_num(centre.detach(), nan=-COORD_CLAMP_PX).clamp(-COORD_CLAMP_PX, COORD_CLAMP_PX)
    return c.floor().long() - half


def window_index(origin: torch.Tensor, side: int, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of ``side x side`` integer windows in an ``(h, w)`` map.

    Args:
        origin: (..., 2) int64 top-left ``(x, y)`` of each window.
        size: (h, w) of the map.

    Returns:
        index: (..., side, side) ``y * w + x`` of each window position (rows ``y``, columns ``x``), clamped into
            the map; inside: (..., side, side) bool, whether the position is in the map (the others read zero).
    """
    h, w = size
    steps = torch.arange(side, device=origin.device)
    xs = origin[..., 0, None] + steps                                        # (..., side)
    ys = origin[..., 1, None] + steps
    inside = ((ys >= 0) & (ys < h))[..., :, None] & ((xs >= 0) & (xs < w))[..., None, :]
    index = ys.clamp(0, h - 1)[..., :, None] * w + xs.clamp(0, w - 1)[..., None, :]
    return index, inside


def bilinear_taps(taps: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
    """Bilinear samples between integer positions: at ``frac`` past each position of ``taps`` but the last row/column.

    Args:
        taps: (L, T, T) values at integer positions (rows ``y``, columns ``x``).
        frac: (L, 2) ``(fx, fy)`` in [0, 1) (differentiable).

    Returns:
        (L, (T-1)^2), rows then columns; in the precision of ``taps`` and ``frac`` together (float32
        coordinates keep their precision when the features are half).
    """
    dtype = torch.promote_types(taps.dtype, frac.dtype)
    taps, frac = taps.to(dtype), frac.to(dtype)
    along_x = torch.lerp(taps[:, :, :-1], taps[:, :, 1:], frac[:, 0, None, None])
    return torch.lerp(along_x[:, :-1], along_x[:, 1:], frac[:, 1, None, None]).reshape(taps.shape[0], -1)


def sample_window(values: torch.Tensor, pos: torch.Tensor, radius: int) -> torch.Tensor:
    """Bilinear samples of windows at ``pos`` plus the ``(2R+1)^2`` integer offsets, zero outside the window.

    The samples read the ``(2R+2)^2`` integer positions from ``floor(pos) - R`` (:func:`window_index`) and blend
    them with the fractional part of ``pos`` (:func:`bilinear_taps`).

    Args:
        values: (L, hw, ww) values at the integer positions of each window (rows ``y``, columns ``x``).
        pos: (L, 2) ``(x, y)`` relative to the window's origin (differentiable).

    Returns:
        (L, (2R+1)^2), offset rows ``dy`` then columns ``dx``, in the precision of ``values`` and ``pos`` together.
    """
    L, hw, ww = values.shape
    origin = window_origin(pos, radius)                                         # (L, 2) first position read
    index, inside = window_index(origin, 2 * radius + 2, (hw, ww))
    taps = values.reshape(L, hw * ww).gather(1, index.view(L, -1)).view(index.shape)
    taps = taps * inside.to(taps.dtype)
    return bilinear_taps(taps, pos - (origin + radius).to(pos.dtype))


def feature_table(fmap: torch.Tensor) -> torch.Tensor:
    """Feature maps (F, C, h, w) as a table (F h w + 1, C): rows ``(frame, y, x)`` of channels and a zero row."""
    Fr, C, h, w = fmap.shape
    return torch.cat([fmap.permute(0, 2, 3, 1).reshape(Fr * h * w, C), fmap.new_zeros(1, C)])


def patch_rows(patch_features: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """(E, P*P, C) features of the patches ``patch`` (E,) of ``patch_features`` (M, C, P, P), scaled by ``C^-1/2``."""
    C, P = patch_features.shape[1], patch_features.shape[-1]
    g = patch_features.index_select(0, patch).reshape(-1, C, P * P).transpose(1, 2)
    return g * C ** -0.5


def window_rows(table: torch.Tensor, size: tuple[int, int], coords: torch.Tensor, target: torch.Tensor,
                radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each edge's window lies and which table rows it reads.

    Args:
        table: (F h w + 1, C) feature table (:func:`feature_table`).  size: (h, w) of its maps.
        coords: (E, P, P, 2) reprojections of the edges' patches, pixels of this level.
        target: (E,) int64 frame (row block of the table) of each edge.

    Returns:
        origin: (E, 2) int64 top-left ``(x, y)`` of the ``S x S`` window around each patch centre;
        rows: (E, S, S) int64 table rows of the window positions, the zero row where outside the map.
    """
    h, w = size
    E, P = coords.shape[0], coords.shape[1]
    S = window_side(radius, P)
    origin = window_origin(coords[:, P // 2, P // 2], S // 2 - 1)
    index, inside = window_index(origin, S, size)
    rows = torch.where(inside, target.view(E, 1, 1) * (h * w) + index, table.shape[0] - 1)
    return origin, rows


def window_correlation(table: torch.Tensor, size: tuple[int, int], patch_features: torch.Tensor,
                       coords: torch.Tensor, target: torch.Tensor, patch: torch.Tensor, radius: int,
                       buffer: BufferFn = None) -> torch.Tensor:
    """The windowed correlation lookup of a set of edges at one level.

    Args:
        table: (F h w + 1, C) feature table (:func:`feature_table`).  size: (h, w) of its maps.
        patch_features: (M, C, P, P) matching features of the patches.
        coords: (E, P, P, 2) reprojections of the edges' patches in this level's pixels (differentiable).
        target: (E,) int64 frame of each edge (row block of ``table``); patch: (E,) int64 its patch.
        buffer: where the window (E S^2, C) and the raw correlation (E, P^2, S^2) go (for inference with
            reused buffers), or None for fresh tensors.  Differentiable by autograd when None, saving the window
            for backward; :class:`WindowCorrelation` is the same lookup with a backward that recomputes it.

    Returns:
        (E, P^2 (2R+1)^2) correlation features.
    """
    E, P = coords.shape[0], coords.shape[1]
    C = table.shape[1]
    S = window_side(radius, P)
    origin, rows = window_rows(table, size, coords, target, radius)
    out = None if buffer is None else buffer("window", (E * S * S, C), table)
    window = torch.index_select(table, 0, rows.reshape(-1), out=out).view(E, S * S, C)
    g = patch_rows(patch_features, patch)                                      # (E, P*P, C)
    out = None if buffer is None else buffer("corr", (E, P * P, S * S), g)
    corr = torch.bmm(g, window.transpose(1, 2), out=out)                       # (E, P*P, S*S)
    pos = coords - origin.view(E, 1, 1, 2).to(coords.dtype)                    # (E, P, P, 2) in the window
    return sample_window(corr.view(E * P * P, S, S), pos.reshape(E * P * P, 2), radius).view(E, -1)


def _edge_chunks(E: int, numbers_per_edge: int) -> list[slice]:
    """Slices of the ``E`` edges such that their windows hold at most :data:`WINDOW_CHUNK_NUMBERS` numbers."""
    step = max(1, WINDOW_CHUNK_NUMBERS // max(numbers_per_edge, 1))
    return [slice(i, min(i + step, E)) for i in range(0, E, step)] or [slice(0, 0)]


class WindowCorrelation(torch.autograd.Function):
    """:func:`window_correlation` with a backward that recomputes the gathered windows instead of saving them.

    ``WindowCorrelation.apply(table, patch_features, coords, target, patch, size, radius)`` with the arguments
    of :func:`window_correlation` returns its (E, P^2 (2R+1)^2) features.  Saved for backward: the table and
    the patch features (the clip's feature maps, alive anyway), the coordinates (E, P, P, 2) and the edge
    indices.  Not saved: the windows (E, S^2, C) and raw correlations (E, P^2, S^2); at DPVO's size (E = 20k,
    S = 12, C = 128) the windows alone are 1.5 GB per level and update.  Forward and backward visit the edges
    in chunks of at most :data:`WINDOW_CHUNK_NUMBERS` window numbers, so the transient window is bounded too.

    Gradients reach the table (hence the feature maps), the patch features and the coordinates, as autograd's
    through :func:`window_correlation` (the window placement itself is piecewise constant).  Both passes run
    with autocast off, in the inputs' dtypes, so that the recomputation is the forward's.  The backward is not
    itself differentiable (no double backward).
    """

    @staticmethod
    def forward(ctx, table, patch_features, coords, target, patch, size, radius):
        ctx.save_for_backward(table, patch_features, coords, target, patch)
        ctx.size, ctx.radius = size, radius
        S = window_side(radius, coords.shape[1])
        with torch.autocast(table.device.type, enabled=False):
            out = [window_correlation(table, size, patch_features, coords[sl], target[sl], patch[sl], radius)
                   for sl in _edge_chunks(coords.shape[0], S * S * table.shape[1])]
        return out[0] if len(out) == 1 else torch.cat(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_features):
        table, patch_features, coords, target, patch = ctx.saved_tensors
        need_table, need_patch, need_coords = ctx.needs_input_grad[:3]
        size, R = ctx.size, ctx.radius
        C, P = table.shape[1], coords.shape[1]
        S = window_side(R, P)
        grad_table = torch.zeros_like(table) if need_table else None
        grad_patch = torch.zeros_like(patch_features) if need_patch else None
        grad_coords = torch.zeros_like(coords) if need_coords else None
        with torch.autocast(table.device.type, enabled=False):
            for sl in _edge_chunks(coords.shape[0], S * S * C):
                c, k = coords[sl], patch[sl]
                e = c.shape[0]
                origin, rows = window_rows(table, size, c, target[sl], R)
                window = table.index_select(0, rows.reshape(-1)).view(e, S * S, C)    # recomputed, not saved
                g = patch_rows(patch_features, k)                                     # (e, P*P, C)
                corr = torch.bmm(g, window.transpose(1, 2))                           # (e, P*P, S*S)
                pos = c - origin.view(e, 1, 1, 2).to(c.dtype)
                with torch.enable_grad():                      # the bilinear sampling: small, by autograd
                    corr_in = corr.detach().requires_grad_()
                    pos_in = pos.detach().requires_grad_(bool(need_coords))
                    sampled = sample_window(corr_in.view(e * P * P, S, S), pos_in.reshape(e * P * P, 2), R)
                    grads = torch.autograd.grad(sampled, (corr_in, pos_in) if need_coords else (corr_in,),
                                                grad_features[sl].reshape(sampled.shape).to(sampled.dtype))
                grad_corr = grads[0].to(corr.dtype)
                if need_coords:
                    grad_coords[sl] = grads[1].view(e, P, P, 2)
                if need_patch:                                 # corr = g window^T, g = features * C^-1/2
                    grad_g = torch.bmm(grad_corr, window).mul_(C ** -0.5)          # (e, P*P, C)
                    grad_patch.index_add_(0, k, grad_g.transpose(1, 2).reshape(e, C, P, P))
                if need_table:
                    grad_window = torch.bmm(grad_corr.transpose(1, 2), g)          # (e, S*S, C)
                    grad_table.index_add_(0, rows.reshape(-1), grad_window.reshape(-1, C))
        return grad_table, grad_patch, grad_coords, None, None, None, None


# ---------------------------------------------------------------------------------------------- the lookups
class CorrBlock:
    """Correlation features for the edges of a patch graph, by windows around the reprojections.

    Args:
        fmap: (B, N, C, h, w) matching features of the frames.
        patch_features: (B, M, C, P, P) matching features of the patches.
        radius: ``R``; the lookup grid is ``(2R+1)^2`` per pixel and level.
        levels: pooling factors of the pyramid, e.g. ``(1, 4)``.
        recompute: backward by :class:`WindowCorrelation` (recomputes the windows; memory per lookup ``O(E P^2)``)
            when True; plain autograd through :func:`window_correlation` (saves an (E, S^2, C) window per level
            and lookup) when False, the reference the tests hold the first against.
    """

    def __init__(self, fmap: torch.Tensor, patch_features: torch.Tensor, radius: int = 3, levels=(1, 4),
                 recompute: bool = True):
        self.radius = int(radius)
        self.levels = tuple(int(s) for s in levels)
        self.recompute = bool(recompute)
        B, N, C, h, w = fmap.shape
        M, P = patch_features.shape[1], patch_features.shape[-1]
        self.patch_size, self.frames, self.patches = P, N, M
        self.patch_features = patch_features.reshape(B * M, C, P, P)       # batch folded into patches
        self.tables, self.sizes = [], []                                      # and into frames
        for s in self.levels:
            f = fmap.reshape(B * N, C, h, w)
            f = f if s == 1 else F.avg_pool2d(f, s, s)
            self.tables.append(feature_table(f))
            self.sizes.append((f.shape[-2], f.shape[-1]))

    @property
    def feature_dim(self) -> int:
        """Length of the correlation feature of one edge."""
        return len(self.levels) * self.patch_size ** 2 * (2 * self.radius + 1) ** 2

    def __call__(self, coords: torch.Tensor, jj: torch.Tensor, kk: torch.Tensor) -> torch.Tensor:
        """Correlation features (B, E, feature_dim) of reprojections ``coords`` (B, E, P, P, 2) (feature pixels)
        of patches ``kk`` (E,) in frames ``jj`` (E,), levels in order."""
        B, E, P = coords.shape[:3]
        batch = torch.arange(B, device=coords.device).view(B, 1)
        target = (batch * self.frames + jj.view(1, E)).reshape(-1)
        patch = (batch * self.patches + kk.view(1, E)).reshape(-1)
        coords = coords.reshape(B * E, P, P, 2)
        out = []
        for table, size, s in zip(self.tables, self.sizes, self.levels):
            c = (coords + 0.5) / s - 0.5
            if self.recompute:
                f = WindowCorrelation.apply(table, self.patch_features, c, target, patch, size, self.radius)
            else:
                f = window_correlation(table, size, self.patch_features, c, target, patch, self.radius)
            out.append(f.view(B, E, -1))
        return torch.cat(out, dim=-1)


class _GradientBuffer:
    """Where the lookups of one volume accumulate its gradient (one buffer instead of one per lookup)."""

    def __init__(self):
        self.grad = None


class _Volume(torch.autograd.Function):
    """``volume = g @ f``; its backward consumes the gradient the lookups scattered into the shared buffer."""

    @staticmethod
    def forward(ctx, g, f, buffer):
        ctx.save_for_backward(g, f)
        ctx.buffer = buffer
        ctx.set_materialize_grads(False)
        return torch.matmul(g, f)

    @staticmethod
    def backward(ctx, grad_volume):
        g, f = ctx.saved_tensors
        grad = ctx.buffer.grad
        ctx.buffer.grad = None
        if grad_volume is not None:
            grad = grad_volume if grad is None else grad + grad_volume
        if grad is None:
            return None, None, None
        grad = grad.view(g.shape[0], g.shape[1], f.shape[2])
        return torch.matmul(grad, f.transpose(1, 2)), torch.matmul(g.transpose(1, 2), grad), None


class _Gather(torch.autograd.Function):
    """``volume.gather(1, index)`` whose backward adds into the volume's shared buffer (and returns None)."""

    @staticmethod
    def forward(ctx, volume, index, buffer):
        ctx.save_for_backward(index)
        ctx.buffer = buffer
        ctx.volume_shape = volume.shape
        ctx.volume_dtype = volume.dtype
        return volume.gather(1, index)

    @staticmethod
    def backward(ctx, grad_out):
        (index,) = ctx.saved_tensors
        if ctx.buffer.grad is None:
            ctx.buffer.grad = torch.zeros(ctx.volume_shape, dtype=ctx.volume_dtype, device=grad_out.device)
        ctx.buffer.grad.scatter_add_(1, index, grad_out)
        return None, None, None


class AllPairsCorrBlock:
    """The same lookup as :class:`CorrBlock`, from a correlation volume precomputed once per clip.

    The volume holds the correlation of every patch pixel with every pixel of
    every frame, per pyramid level: (B, M, P*P, N, h_l, w_l).  It costs one
    large matrix product per clip and ``M P^2 N h w`` numbers of memory; each
    lookup then gathers, per edge pixel, the ``(2R+2) x (2R+2)`` integer window
    of the volume that its ``(2R+1)^2`` bilinear samples read, and blends it
    with :func:`bilinear_taps`.  For a training clip, whose features stay fixed
    over many updates, this is several times cheaper than the windowed lookup;
    for long streaming windows, or clips whose volume does not fit, the windowed
    :class:`CorrBlock` is the one to use.  Values (and gradients) equal
    :class:`CorrBlock`'s.
    """

    def __init__(self, fmap: torch.Tensor, patch_features: torch.Tensor, radius: int = 3, levels=(1, 4)):
        self.radius = int(radius)
        self.levels = tuple(int(s) for s in levels)
        B, M, C, P, _ = patch_features.shape
        self.patch_size = P
        scale = C ** -0.5
        g = patch_features.reshape(B, M, C, P * P).permute(0, 1, 3, 2).reshape(B, M * P * P, C)
        N, h, w = fmap.shape[1], fmap.shape[-2], fmap.shape[-1]
        self.volumes, self.shapes, self.buffers = [], [], []
        for s in self.levels:
            f = fmap if s == 1 else F.avg_pool2d(fmap.reshape(B * N, C, h, w), s, s).reshape(
                B, N, C, h // s, w // s)
            hl, wl = f.shape[-2:]
            flat = f.permute(0, 2, 1, 3, 4).reshape(B, C, N * hl * wl) * scale
            buffer = _GradientBuffer()
            self.volumes.append(_Volume.apply(g, flat, buffer).reshape(B, -1))   # (B, M*P*P*N*hl*wl)
            self.buffers.append(buffer)
            self.shapes.append((N, hl, wl))

    @property
    def feature_dim(self) -> int:
        return len(self.levels) * self.patch_size ** 2 * (2 * self.radius + 1) ** 2

    @staticmethod
    def volume_size(B: int, M: int, P: int, N: int, h: int, w: int, levels=(1, 4)) -> int:
        """Numbers held by the volumes of a clip (to choose between the two blocks)."""
        return sum(B * M * P * P * N * (h // s) * (w // s) for s in levels)

    def __call__(self, coords: torch.Tensor, jj: torch.Tensor, kk: torch.Tensor) -> torch.Tensor:
        """As :meth:`CorrBlock.__call__`: (B, E, feature_dim) for ``coords`` (B, E, P, P, 2), ``jj``, ``kk`` (E,)."""
        out = [self._lookup(v, shape, (coords + 0.5) / s - 0.5, jj, kk, buf)
               for v, shape, s, buf in zip(self.volumes, self.shapes, self.levels, self.buffers)]
        return torch.cat(out, dim=-1)

    def _lookup(self, volume, shape, coords, jj, kk, buffer):
        N, h, w = shape
        B, E, P = coords.shape[:3]
        R = self.radius
        T = 2 * R + 2                                                           # integer positions a pixel reads
        origin = window_origin(coords, R)                                       # (B, E, P, P, 2) first position read
        index, inside = window_index(origin, T, (h, w))                         # (B, E, P, P, T, T)
        pixel = torch.arange(P * P, device=coords.device).view(1, 1, P, P)
        base = ((kk.view(1, E, 1, 1) * (P * P) + pixel) * N + jj.view(1, E, 1, 1)) * (h * w)   # (1, E, P, P)
        idx = (base[..., None, None] + index).reshape(B, -1)
        taps = _Gather.apply(volume, idx, buffer) if volume.requires_grad else volume.gather(1, idx)
        taps = taps.view(-1, T, T) * inside.view(-1, T, T).to(taps.dtype)
        frac = coords - (origin + R).to(coords.dtype)                           # (B, E, P, P, 2)
        return bilinear_taps(taps, frac.reshape(-1, 2)).view(B, E, -1)
