"""Gradient-variance instrumentation of a training run (config section ``instrument``), as TensorBoard dashboards.

The :class:`vo.train.trainer.Trainer` calls :meth:`Instrument.before_backward`
just before the loss's backward pass and :meth:`Instrument.after_backward`
right after it.  With ``s`` the step count after the step (TensorBoard's x
axis, as the ``train/`` scalars):

every step
    each rank's own gradient of every parameter tensor is recorded (by tensor
    hooks during the backward, i.e. before DDP averages them) into
    :class:`vo.instrument.gradstats.GradStats`; the BA's gain ratios (actual / predicted
    cost decrease) of every update are collected (cause 2).
every ``stats_every`` steps
    the window statistics of every parameter over the last ``window`` steps
    of every rank (``gradstats/snr_db/<param>``, ``gradstats/mean_norm/...``,
    ``gradstats/total_variance/...``, ``gradstats/noise/...``) and the gain-ratio
    summary of the interval (``cause2/gain_ratio_median`` ...).
every ``probe_every`` steps (a *probe step*)
    cause 1: the gradient of each loss term w.r.t. the probe layers, averaged
    over the ranks: ``cause1/norm/<layer>/<term>``, ``cause1/cos/<layer>/<a>_vs_<b>``;
    cause 2: the SNR of the target gradients when the BA of update
    ``probe_update`` starts from a perturbed state,
    ``cause2/target_snr_db/<pose|depth>/<objective>/sigma_<level>`` (mean over ranks);
    cause 3: the correlation across edges (pooled over the ranks) between
    the weight-gradient magnitude and the BA residual, ``cause3/corr_linear``,
    ``cause3/corr_log``; and histograms ``grad/<layer>`` of the probe layers'
    gradients.  Probes are skipped in the structure-only phase except cause 1's
    flow term and cause 3.

Rank 0 writes the scalars, the histograms and (once) the custom-scalars
layout: one page per cause and a page of per-layer SNR.  Every value is
also appended to :attr:`Instrument.history` on every rank.  The
instrumentation never changes the training: it draws its noise from its own
generator and only reads the gradients.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from vo.config import dataclass_from_section
from vo.instrument.causes import (
    LINEARIZATION_OBJECTIVES,
    PearsonSums,
    gain_ratio_summary,
    gain_ratios,
    ground_truth_of,
    interference,
    linearization_snr,
    loss_term_gradients,
    problem_of_update,
    residual_dependence,
    term_contributions,
)
from vo.instrument.gradstats import STATUS_NO_GRADIENT, GradientRecorder, GradStats
from vo.train.distributed import step_generator

#: The instrumentation's random stream (perturbations) is seeded from (seed + this, step, rank).
INSTRUMENT_SEED_OFFSET = 9_191_919
SAMPLE_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}
#: Tag prefixes of the dashboard's pages.
CAUSE_PAGES = {
    "cause1": "Cause 1: flow-loss interference",
    "cause2": "Cause 2: BA linearisation",
    "cause3": "Cause 3: residual dependence",
    "gradstats": "Per-layer gradient SNR",
}


@dataclass
class InstrumentConfig:
    """Config section ``instrument`` (module docstring)."""

    enabled: bool = True
    window: int = 20                  # steps (per rank) of the running gradient statistics
    stats_every: int = 10             # steps between gradient statistics / gain-ratio summaries
    probe_every: int = 50             # steps between probe steps (causes 1-3), 0: never
    probe_update: int = -1            # the update whose BA the linearisation probe perturbs (>= 1 or negative)
    pose_noise: list = field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1])   # std of xi (scene units / rad)
    depth_noise: list = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.5])    # std of log inverse depth
    trials: int = 3                   # perturbed BA runs per noise level
    histograms: bool = True
    sample_dtype: str = "float32"     # dtype of the stored gradient samples

    @classmethod
    def from_dict(cls, d: dict) -> "InstrumentConfig":
        cfg = dataclass_from_section(cls, d, "instrument")
        if cfg.window < 1 or cfg.stats_every < 1 or cfg.probe_every < 0 or cfg.trials < 1:
            raise ValueError(f"instrument config: expected window >= 1, stats_every >= 1, probe_every >= 0, "
                             f"trials >= 1; got {cfg}")
        if cfg.sample_dtype not in SAMPLE_DTYPES:
            raise ValueError(f"instrument.sample_dtype: expected one of {sorted(SAMPLE_DTYPES)}, "
                             f"got '{cfg.sample_dtype}'")
        for name in ("pose_noise", "depth_noise"):
            levels = getattr(cfg, name)
            if not all(isinstance(x, (int, float)) and x >= 0 for x in levels):
                raise ValueError(f"instrument.{name}: expected a list of noise levels >= 0, got {levels}")
        return cfg


def level_tag(sigma: float) -> str:
    return f"sigma_{float(sigma):g}"


def dashboard_layout(param_names: list[str], probe_names: dict[str, str], cfg: InstrumentConfig) -> dict:
    """The custom-scalars layout: ``{page: {chart: ["Multiline", [tag regexes]]}}``, one page per cause + SNR."""
    terms = ("flow", "translation", "rotation")
    pairs = [f"{a}_vs_{b}" for i, a in enumerate(terms) for b in terms[i + 1:]]
    layers = list(probe_names) + ["all"]
    cause1 = {f"cosine {pair.replace('_vs_', ' vs ')} (per probe layer)": ["Multiline", [f"cause1/cos/.*/{pair}"]]
              for pair in pairs}
    cause1.update({f"gradient norm per loss term: {layer}": ["Multiline", [f"cause1/norm/{layer}/.*"]]
                   for layer in layers})
    cause2 = {"gain ratio = actual / predicted BA cost decrease": ["Multiline", [r"cause2/gain_ratio_(median|mean)$"]],
              "median gain ratio per update": ["Multiline", [r"cause2/gain_ratio_median_by_update/.*"]],
              "fraction of poor (< 0.25) and cost-increasing BA steps": [
                  "Multiline", [r"cause2/poor_step_fraction", r"cause2/cost_increase_fraction"]]}
    for kind in ("pose", "depth"):
        for obj in LINEARIZATION_OBJECTIVES:
            cause2[f"target-gradient SNR (dB) under {kind} noise, {obj} objective"] = [
                "Multiline", [f"cause2/target_snr_db/{kind}/{obj}/.*"]]
    cause3 = {"corr(|dL/dweights|, BA residual) across edges": ["Multiline", [r"cause3/corr_.*"]],
              "edges used": ["Multiline", [r"cause3/edges"]]}
    snr = {"probe layers: SNR (dB)": ["Multiline", [f"gradstats/snr_db/{re.escape(n)}$" for n in probe_names.values()]],
           "probe layers: mean gradient norm and noise": [
               "Multiline", [f"gradstats/(mean_grad_norm|noise)/{re.escape(n)}$" for n in probe_names.values()]]}
    for group in _groups(param_names):
        snr[f"SNR (dB): {group}"] = ["Multiline", [f"gradstats/snr_db/{re.escape(group)}\\..*"]]
    return {CAUSE_PAGES["cause1"]: cause1, CAUSE_PAGES["cause2"]: cause2, CAUSE_PAGES["cause3"]: cause3,
            CAUSE_PAGES["gradstats"]: snr}


def _groups(names: list[str]) -> list[str]:
    """Module groups of parameter names: the first two components under ``update``, else the first."""
    out = []
    for n in names:
        parts = n.split(".")
        g = ".".join(parts[:2]) if parts[0] == "update" and len(parts) > 2 else parts[0]
        if g not in out:
            out.append(g)
    return out


class Instrument:
    """The instrumentation of one run (module docstring).

    Args:
        cfg: :class:`InstrumentConfig`.
        model: the :class:`vo.model.network.VONet` (not the DDP wrapper).
        loss_cfg: the run's :class:`vo.train.losses.LossConfig`.
        seed: the run's seed (for the perturbation stream).
        rank: this process's rank.
        writer: a ``SummaryWriter`` (rank 0) or None.
    """

    def __init__(self, cfg: InstrumentConfig, model, loss_cfg, seed: int = 0, rank: int = 0, writer=None):
        self.cfg = cfg
        self.model = model
        self.loss_cfg = loss_cfg
        self.seed = int(seed)
        self.rank = int(rank)
        self.writer = writer
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        device = self.params[0].device
        self.stats = GradStats([(n, p.shape) for n, p in named], cfg.window, device, SAMPLE_DTYPES[cfg.sample_dtype])
        probes = model.update.probe_layers
        by_id = {id(p): n for n, p in named}
        self.probe_params = dict(probes)
        self.probe_names = {k: by_id[id(p)] for k, p in probes.items()}
        self.history: list[dict] = []
        self._probe = False
        self._ratios: dict[int, list[torch.Tensor]] = {}     # update index -> gain ratios since the last summary
        self._probe_values: dict = {}
        self._time = 0.0
        self.recorder = GradientRecorder(self.params, self.stats)
        if self.writer is not None:
            self.writer.add_custom_scalars(dashboard_layout(self.param_names, self.probe_names, cfg))
            self.writer.flush()

    @classmethod
    def for_trainer(cls, trainer) -> Optional["Instrument"]:
        """The trainer's instrumentation from its config's ``instrument`` section; None when absent or disabled."""
        section = trainer.cfg.get("instrument")
        if section is None:
            return None
        cfg = InstrumentConfig.from_dict(dict(section))
        if not cfg.enabled:
            return None
        iters = int(trainer.train_cfg.iters)
        if cfg.probe_every > 0 and iters >= 2 and not (1 <= cfg.probe_update < iters or -iters < cfg.probe_update < 0):
            raise ValueError(f"instrument.probe_update: expected an update in [1, {iters}) or [-{iters - 1}, -1] "
                             f"(train.iters = {iters}; update 0's start state is not kept), got {cfg.probe_update}")
        logger = trainer.logger
        writer = getattr(logger, "writer", None) if logger is not None and trainer.dist.is_main else None
        return cls(cfg, trainer.model, trainer.loss_cfg, trainer.seed, trainer.dist.rank, writer)

    def close(self) -> None:
        """Remove the gradient hooks."""
        self.recorder.remove()

    # ------------------------------------------------------------------ the step
    def is_probe_step(self, step: int) -> bool:
        return self.cfg.probe_every > 0 and (step + 1) % self.cfg.probe_every == 0

    def before_backward(self, trainer, step: int, output, terms, batch: dict, structure_only: bool) -> None:
        """Probe causes 1 and 2 on probe steps (the graph is kept), then start recording the gradient sample."""
        t0 = time.perf_counter()
        self._probe = self.is_probe_step(step)
        self._probe_values = {}
        if self._probe:
            self._probe_values.update(self._cause1(trainer, terms, structure_only))
            for st in output.steps:
                if st.weights.requires_grad:
                    st.weights.retain_grad()
            if not structure_only and len(output.steps) >= 2:
                self._probe_values.update(self._cause2_linearization(step, output, batch))
        self.recorder.start()
        self._time = time.perf_counter() - t0

    def after_backward(self, trainer, step: int, output) -> dict:
        """Close the gradient sample; cause 3 on probe steps; statistics and logging at their cadence."""
        t0 = time.perf_counter()
        scaler = trainer.scaler
        self.recorder.stop(float(scaler.get_scale()) if scaler.is_enabled() else 1.0)
        for k, st in enumerate(output.steps):
            self._ratios.setdefault(k, []).append(gain_ratios([st.ba_status]))
        s = step + 1
        values = dict(self._probe_values)
        if self._probe:
            values.update(self._cause3(output))
            self._histograms(s, scaler)
        if s % self.cfg.stats_every == 0:
            values.update(self._gradient_statistics())
            values.update(self._gain_ratio_summary())
        if values:
            self._write(values, s)
            self.history.append({"step": s, **values})
        self._time += time.perf_counter() - t0 + self.recorder.seconds
        return {"instrument/time_s": self._time, "instrument/probe_step": self._probe}

    # ------------------------------------------------------------------ causes
    def _cause1(self, trainer, terms, structure_only: bool) -> dict:
        contributions = term_contributions(terms, self.loss_cfg, trainer.balancer.flow_coeff,
                                           trainer.balancer.rotation_coeff, structure_only)
        grads = loss_term_gradients(contributions, self.probe_params)
        if _distributed():
            flat = torch.cat([g.reshape(-1) for t in grads.values() for g in t.values()]).double()
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            pos = 0
            for t in grads.values():
                for k, g in t.items():
                    t[k] = flat[pos:pos + g.numel()].view_as(g)
                    pos += g.numel()
        return {f"cause1/{k}": v for k, v in interference(grads).items()}

    def _cause2_linearization(self, step: int, output, batch: dict) -> dict:
        model = self.model
        problem = problem_of_update(output, self.cfg.probe_update, model.ba_cfg, model.cfg.patch_size)
        truth = ground_truth_of(output, batch["T_wc"].to(torch.float32), batch["depths"], batch["depth_valid"],
                                self.loss_cfg.edge_set, self.loss_cfg.detach_alignment_scale)
        g = step_generator(self.seed + INSTRUMENT_SEED_OFFSET, step, self.rank, "cpu")
        snr = linearization_snr(problem, truth, self.cfg.pose_noise, self.cfg.depth_noise, self.cfg.trials, g)
        keys, vals = [], []
        for kind, levels in (("pose", self.cfg.pose_noise), ("depth", self.cfg.depth_noise)):
            for obj, dbs in snr[kind].items():
                for sigma, db in zip(levels, dbs):
                    keys.append(f"cause2/target_snr_db/{kind}/{obj}/{level_tag(sigma)}")
                    vals.append(db)
        return _mean_over_ranks(keys, vals, self.params[0].device)

    def _cause3(self, output) -> dict:
        grads = [st.weights.grad if st.weights.requires_grad else None for st in output.steps]
        rd = residual_dependence(output, grads)
        sums = _sum_over_ranks(torch.cat([rd.linear.sums, rd.log.sums]), self.params[0].device)
        linear, log = PearsonSums(sums[:6]), PearsonSums(sums[6:])
        out = {"cause3/edges": float(linear.count)}
        for name, ps in (("linear", linear), ("log", log)):
            r = ps.correlation()
            if r is not None:
                out[f"cause3/corr_{name}"] = r
        return out

    def _gradient_statistics(self) -> dict:
        stats = self.stats.compute()
        out = {}
        for name, st in stats.items():
            if st.status == STATUS_NO_GRADIENT:
                continue
            out[f"gradstats/snr_db/{name}"] = st.snr_db
            out[f"gradstats/mean_grad_norm/{name}"] = st.mean_grad_norm
            out[f"gradstats/mean_norm/{name}"] = st.mean_norm
            out[f"gradstats/noise/{name}"] = st.noise
            out[f"gradstats/total_variance/{name}"] = st.total_variance
        out["gradstats/no_gradient_tensors"] = float(sum(st.status == STATUS_NO_GRADIENT for st in stats.values()))
        out["gradstats/samples"] = float(next(iter(stats.values())).count)
        return out

    def _gain_ratio_summary(self) -> dict:
        """Gain-ratio summary since the last one, pooled over the ranks; medians per update index too."""
        per_update = {k: torch.cat(v) for k, v in self._ratios.items()}
        self._ratios = {}
        if _distributed():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, per_update)
            per_update = {k: torch.cat([g[k].double() for g in gathered if k in g])
                          for k in sorted({k for g in gathered for k in g})}
        everything = torch.cat(list(per_update.values())) if per_update else torch.zeros(0, dtype=torch.float64)
        out = {f"cause2/{k}": v for k, v in gain_ratio_summary(everything).items()}
        for k, ratios in per_update.items():
            if ratios.numel():
                out[f"cause2/gain_ratio_median_by_update/update_{k}"] = float(ratios.median())
        return out

    def _histograms(self, s: int, scaler) -> None:
        if self.writer is None or not self.cfg.histograms:
            return
        scale = float(scaler.get_scale()) if scaler.is_enabled() else 1.0
        for layer, p in self.probe_params.items():
            if p.grad is not None:
                self.writer.add_histogram(f"grad/{layer}", (p.grad.detach().float() / scale).cpu(), s)

    def _write(self, values: dict, s: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and v == v and abs(v) != float("inf"):
                self.writer.add_scalar(k, float(v), s)
        self.writer.flush()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _sum_over_ranks(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The sum over ranks of a CPU tensor (reduced on ``device``, the backend's), returned on the CPU."""
    if not _distributed():
        return x
    y = x.to(device)
    dist.all_reduce(y)
    return y.cpu()


def _mean_over_ranks(keys: list[str], values: list[float], device: torch.device) -> dict:
    """Mean over ranks of each value, leaving out NaN (undefined) ones; keys with no defined value are dropped."""
    v = torch.tensor(values, dtype=torch.float64)
    defined = ~torch.isnan(v)
    both = _sum_over_ranks(torch.cat([torch.where(defined, v, torch.zeros_like(v)), defined.double()]), device)
    n = len(values)
    sums, counts = both[:n], both[n:]
    return {k: float(s / c) for k, s, c in zip(keys, sums.tolist(), counts.tolist()) if c > 0}
