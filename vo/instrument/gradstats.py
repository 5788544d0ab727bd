"""Running gradient statistics per parameter tensor over a window of steps, aggregated over DDP ranks.

Each step every rank records its *own* gradient of every parameter tensor
(before DistributedDataParallel averages them): the samples of a tensor are
``g_1 .. g_n``, the last ``window`` steps of every rank (``n = window x
world_size`` once the window is full).  :meth:`GradStats.compute` all-reduces
the sums it needs, so every rank holds the statistics of the *concatenated*
samples, not of its own.  For a tensor with samples ``g_s`` (flattened)::

    mean      m = 1/n sum_s g_s                          (elementwise)
    variance  v = 1/n sum_s (g_s - m)^2                  (elementwise, ddof 0 like numpy.var)
    total_variance = sum over elements of v = 1/n sum_s ||g_s - m||^2
    mean_norm = 1/n sum_s ||g_s||,  mean_grad_norm = ||m||
    noise     = 1/n sum_s ||g_s - m||
    SNR       = ||m|| / noise                            (V2V's definition, evaluate_snr.py)
    SNR_dB    = 20 log10(SNR)                            (an amplitude ratio)

A constant gradient has zero noise: its SNR is ``inf`` and its SNR_dB is
capped at :data:`MAX_SNR_DB`; a zero mean gives SNR 0 and SNR_dB
:data:`MIN_SNR_DB`.  A tensor that received no gradient at all (every sample
zero) has no SNR: its ``status`` says so and it is left out of the logs.

The window is a ring buffer of ``window`` flattened gradient samples per rank
(``window x (number of parameters)`` values of ``sample_dtype``, float32 by
default); the reductions run in float64.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

#: SNR in decibels is clipped to [MIN_SNR_DB, MAX_SNR_DB] (dB): a constant gradient (zero noise) has infinite
#: SNR, a zero-mean one has SNR 0 (minus infinity dB).
MAX_SNR_DB = 120.0
MIN_SNR_DB = -120.0
#: ``status`` values of :class:`TensorGradStats`.
STATUS_OK = "ok"                   # finite, positive noise
STATUS_CONSTANT = "constant"       # zero noise, nonzero mean: SNR inf, SNR_dB = MAX_SNR_DB
STATUS_NO_GRADIENT = "no_gradient" # every sample zero: no SNR


def snr_db(snr: float) -> float:
    """``20 log10(snr)`` clipped to [MIN_SNR_DB, MAX_SNR_DB] (``inf`` -> MAX_SNR_DB, 0 -> MIN_SNR_DB)."""
    if snr != snr:  # NaN
        raise ValueError("snr_db: SNR is NaN (undefined); check the status before converting")
    if snr <= 0:
        return MIN_SNR_DB
    if math.isinf(snr):
        return MAX_SNR_DB
    return float(min(max(20.0 * math.log10(snr), MIN_SNR_DB), MAX_SNR_DB))


def snr_of_samples(samples: torch.Tensor, reference: Optional[torch.Tensor] = None) -> tuple[float, float]:
    """V2V's SNR of gradient samples (n, D): ``||m|| / mean_s ||g_s - m||`` and its dB value.

    ``m`` is the samples' mean, or ``reference`` (D,) when given (V2V's
    linearisation analysis: the gradient at the unperturbed point is the
    signal, the deviations of the perturbed gradients from it the noise).
    Computed in float64.  Returns ``(snr, snr_db)`` with the conventions of
    the module docstring (``inf`` for zero noise and a nonzero signal); raises
    if both the signal and the noise are zero (no gradient: no SNR).
    """
    if samples.dim() != 2 or samples.shape[0] < 1:
        raise ValueError(f"samples: expected shape (n >= 1, D), got {tuple(samples.shape)}")
    x = samples.detach().double()
    m = x.mean(0) if reference is None else reference.detach().double().reshape(-1)
    if m.shape[0] != x.shape[1]:
        raise ValueError(f"reference: expected {x.shape[1]} values like each sample, got {m.shape[0]}")
    signal = float(m.norm())
    noise = float((x - m).norm(dim=1).mean())
    if noise == 0.0:
        if signal == 0.0:
            raise ValueError("snr_of_samples: every sample and the reference are zero: the SNR is undefined")
        return math.inf, MAX_SNR_DB
    snr = signal / noise
    return snr, snr_db(snr)


@dataclass
class TensorGradStats:
    """Window statistics of one parameter tensor (module docstring); ``mean``/``variance`` are float64 tensors."""

    name: str
    count: int                  # samples n over all ranks
    mean: torch.Tensor          # parameter's shape
    variance: torch.Tensor      # parameter's shape, ddof 0
    total_variance: float
    mean_norm: float            # mean over samples of ||g_s||
    mean_grad_norm: float       # ||m||
    noise: float                # mean over samples of ||g_s - m||
    snr: float                  # inf for STATUS_CONSTANT, NaN for STATUS_NO_GRADIENT
    snr_db: float               # NaN for STATUS_NO_GRADIENT
    last_norm: float            # norm of this rank's most recent sample (NaN if that sample was rejected)
    status: str


class GradStats:
    """Ring buffer of per-rank gradient samples and their window statistics.

    Args:
        named_shapes: ``[(name, shape)]`` of the parameter tensors, in a fixed order
            (the same on every rank).
        window: number of steps (samples per rank) the statistics cover.
        device: where the buffer lives (the parameters' device).
        sample_dtype: dtype of the stored samples.

    Use :meth:`record` with one gradient per tensor (or :meth:`begin`, :meth:`put`
    and :meth:`commit` to fill a sample piecewise, e.g. from gradient hooks),
    and :meth:`compute` on every rank at the same step.
    """

    def __init__(self, named_shapes: Sequence[tuple[str, Sequence[int]]], window: int,
                 device: torch.device | str = "cpu", sample_dtype: torch.dtype = torch.float32):
        if window < 1:
            raise ValueError(f"window: expected >= 1 samples, got {window}")
        if not named_shapes:
            raise ValueError("named_shapes: expected at least one parameter tensor")
        self.names = [n for n, _ in named_shapes]
        self.shapes = [torch.Size(s) for _, s in named_shapes]
        sizes = [s.numel() for s in self.shapes]
        self.offsets = [0]
        for n in sizes:
            self.offsets.append(self.offsets[-1] + n)
        self.window = int(window)
        self.device = torch.device(device)
        self.buffer = torch.zeros(self.window, self.offsets[-1], dtype=sample_dtype, device=self.device)
        self.valid = torch.zeros(self.window, dtype=torch.bool)
        self.position = 0                 # row of the next sample
        self.recorded = 0                 # samples committed (this rank)
        self.rejected = 0                 # samples with non-finite values (this rank)
        self._open: Optional[torch.Tensor] = None
        self._filled: list[bool] = []

    @property
    def n_tensors(self) -> int:
        return len(self.names)

    @property
    def filled(self) -> int:
        """Valid samples currently in this rank's window."""
        return int(self.valid.sum())

    # ------------------------------------------------------------------ recording
    def begin(self) -> None:
        """Open a new sample (zeros) in place of the oldest; fill it with :meth:`put`, close it with :meth:`commit`.

        The window is the last ``window`` samples opened; a rejected sample
        (:meth:`commit`) leaves a gap in it.
        """
        self.valid[self.position] = False
        self._open = self.buffer[self.position]
        self._open.zero_()
        self._filled = [False] * self.n_tensors

    def put(self, index: int, grad: torch.Tensor) -> None:
        """Copy the gradient of tensor ``index`` (its parameter's shape) into the open sample."""
        if self._open is None:
            raise RuntimeError("GradStats.put: no open sample; call begin() first")
        if grad.shape != self.shapes[index]:
            raise ValueError(f"gradient of {self.names[index]}: expected shape {tuple(self.shapes[index])}, "
                             f"got {tuple(grad.shape)}")
        a, b = self.offsets[index], self.offsets[index + 1]
        self._open[a:b].copy_(grad.detach().reshape(-1))
        self._filled[index] = True

    def commit(self, scale: float = 1.0) -> bool:
        """Close the open sample, dividing it by ``scale`` (a loss scale); False if it was rejected.

        Tensors that received no gradient count as zero.  A sample with a
        non-finite value is not used (counted in ``rejected``).
        """
        if self._open is None:
            raise RuntimeError("GradStats.commit: no open sample; call begin() first")
        row = self._open
        self._open = None
        if scale != 1.0:
            row.div_(scale)
        ok = bool(torch.isfinite(row).all())
        self.valid[self.position] = ok
        self.position = (self.position + 1) % self.window
        if not ok:
            self.rejected += 1
            return False
        self.recorded += 1
        return True

    def record(self, grads: Sequence[Optional[torch.Tensor]], scale: float = 1.0) -> bool:
        """Record one sample: one gradient (or None: zero) per tensor, in the constructor's order."""
        if len(grads) != self.n_tensors:
            raise ValueError(f"grads: expected {self.n_tensors} tensors, got {len(grads)}")
        self.begin()
        for i, g in enumerate(grads):
            if g is not None:
                self.put(i, g)
        return self.commit(scale)

    def reset(self) -> None:
        self.valid.zero_()
        self.position = 0

    # ------------------------------------------------------------------ statistics
    def compute(self, group: Optional[dist.ProcessGroup] = None) -> dict[str, TensorGradStats]:
        """Statistics of every tensor over the window, over all ranks of ``group`` (a collective).

        Every rank of an initialised process group must call it at the same
        point; without one (or with one process) the statistics are this
        process's.  Two all-reduces: the sums and count (for the mean), then
        the squared deviations and the per-sample norms.  Tensor by tensor in
        float64 (the window is read a slice at a time).  Raises if no rank
        holds a sample.
        """
        distributed = dist.is_available() and dist.is_initialized()
        valid = self.valid.to(self.device)
        x = self.buffer if bool(valid.all()) else self.buffer[valid]              # (n_local, D)
        slices = [x[:, a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]
        D, T = self.offsets[-1], self.n_tensors
        first = torch.cat([x.sum(0, dtype=torch.float64), x.new_tensor([float(x.shape[0])], dtype=torch.float64)])
        if distributed:
            dist.all_reduce(first, group=group)
        n = int(round(float(first[-1])))
        if n == 0:
            raise RuntimeError("GradStats.compute: no gradient sample recorded on any rank")
        mean = first[:-1] / n
        sq_dev, noise, norms = [], [], []
        for i, xi in enumerate(slices):
            xi = xi.double()
            dev = xi - mean[self.offsets[i]:self.offsets[i + 1]]
            d2 = dev * dev
            sq_dev.append(d2.sum(0))
            noise.append(d2.sum(1).sqrt().sum())
            norms.append(xi.pow(2).sum(1).sqrt().sum())
        second = torch.cat(sq_dev + [torch.stack(noise), torch.stack(norms)])
        if distributed:
            dist.all_reduce(second, group=group)
        variance = second[:D] / n
        noise_mean = (second[D:D + T] / n).tolist()
        mean_norm = (second[D + T:] / n).tolist()
        last_row = (self.position - 1) % self.window
        last = [math.nan] * T
        if bool(self.valid[last_row]):
            row = self.buffer[last_row]
            last = [float(row[a:b].double().norm()) for a, b in zip(self.offsets[:-1], self.offsets[1:])]
        out = {}
        for i, name in enumerate(self.names):
            a, b = self.offsets[i], self.offsets[i + 1]
            m = mean[a:b]
            signal = float(m.norm())
            nz = noise_mean[i]
            if nz == 0.0 and signal == 0.0:
                snr, db, status = math.nan, math.nan, STATUS_NO_GRADIENT
            elif nz == 0.0:
                snr, db, status = math.inf, MAX_SNR_DB, STATUS_CONSTANT
            else:
                snr = signal / nz
                db, status = snr_db(snr), STATUS_OK
            var = variance[a:b]
            out[name] = TensorGradStats(
                name=name, count=n, mean=m.view(self.shapes[i]), variance=var.view(self.shapes[i]),
                total_variance=float(var.sum()), mean_norm=mean_norm[i], mean_grad_norm=signal, noise=nz,
                snr=snr, snr_db=db, last_norm=last[i], status=status)
        return out


class GradientRecorder:
    """Records each rank's own gradient of ``params`` into a :class:`GradStats` during a backward pass.

    A tensor hook on every parameter copies the gradient autograd computes
    for it into the open sample -- before it is accumulated into ``.grad``
    and before DistributedDataParallel averages it over the ranks.  Hooks
    copy only between :meth:`start` and :meth:`stop`, so other backward
    passes (``torch.autograd.grad`` probes) are not recorded.

    Args:
        params: the parameter tensors, in the order of ``stats``' tensors.
        stats: the :class:`GradStats` to fill.
    """

    def __init__(self, params: Sequence[torch.Tensor], stats: GradStats):
        if len(params) != stats.n_tensors:
            raise ValueError(f"params: expected {stats.n_tensors} tensors like stats, got {len(params)}")
        for i, p in enumerate(params):
            if p.shape != stats.shapes[i]:
                raise ValueError(f"params[{i}] ({stats.names[i]}): expected shape {tuple(stats.shapes[i])}, "
                                 f"got {tuple(p.shape)}")
        self.stats = stats
        self.active = False
        self.seconds = 0.0                    # time spent in the hooks since the last start()
        self._handles = [p.register_hook(self._hook(i)) for i, p in enumerate(params)]

    def _hook(self, index: int):
        def hook(grad: torch.Tensor):
            if self.active:
                t0 = time.perf_counter()
                self.stats.put(index, grad)
                self.seconds += time.perf_counter() - t0
            return None
        return hook

    def start(self) -> None:
        """Open a sample; the next backward pass fills it."""
        self.seconds = 0.0
        self.stats.begin()
        self.active = True

    def stop(self, scale: float = 1.0) -> bool:
        """Close the sample (divided by the loss ``scale``); False if it was rejected (non-finite)."""
        self.active = False
        return self.stats.commit(scale)

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
