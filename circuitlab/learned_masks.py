"""Learned edge masks: Edge Pruning (Bhaskar, Wettig, Friedman & Chen, "Finding Transformer
Circuits with Edge Pruning", NeurIPS 2024, arXiv:2406.16778; github.com/princeton-nlp/Edge-Pruning).

Every edge u -> r of circuitlab.graph gets a continuous mask z_ru in [0, 1], drawn each step
from a hard-concrete distribution (Louizos, Welling & Kingma 2018, "Learning Sparse Neural
Networks through L0 Regularization") with a learned logit log_alpha_ru:

    u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta),
    z = clamp(s (zeta - gamma) + gamma, 0, 1)          beta = 2/3, gamma = -0.1, zeta = 1.1

so that z is exactly 0 or 1 with positive probability and differentiable in log_alpha in
between. The masks run the edge-masked forward of the runner (``EdgeRunner.run``, its
ablation: resample, mean or zero) and are trained by Adam on

    faithfulness(z) + sparsity(z)

faithfulness: how far the masked model is from the full one on the runner's batch. With
``metric=None`` it is Edge Pruning's objective, the mean over examples of KL(clean || masked)
at the answer positions; with a minigpt2.engine.Metric it is the mean over examples of
|metric(masked) - metric(clean)| (per example, so that errors of opposite sign do not
cancel); with a plain callable logits [V, B, vocab] -> [V], |metric(masked) - metric(clean)|.

sparsity, in terms of the expected number of kept edges E[L0] = sum_ru P(z_ru > 0) =
sum_ru sigmoid(log_alpha_ru - beta log(-gamma / zeta)), one of:

* ``penalty=lam``: the L0 penalty lam * E[L0] (lam is the faithfulness an edge must buy to
  be kept). The circuit: the edges whose deterministic mask clamp(sigmoid(log_alpha)
  (zeta - gamma) + gamma, 0, 1) is >= 0.5, that is log_alpha >= 0.
* ``target_edges=k``: Edge Pruning's sparsity target. With f = E[L0] / n_edges the expected
  kept fraction and t its target, the loss gets lambda_1 (f - t) + lambda_2 (f - t)^2, the
  Lagrange multipliers lambda_1, lambda_2 trained by gradient ascent (so the constraint
  tightens while it is violated); t goes linearly from 1 (the full graph) to k / n_edges
  over the first ``warmup`` fraction of the steps. The circuit: exactly the k edges with
  the largest log_alpha.

Only the edges of ``runner.graph.valid`` carry masks; every other entry stays 0.

Initialisation (log_alpha at step 0): ``init="uniform"``: ``init_logit`` on every edge (plus
N(0, 0.01^2) jitter from the seed, as Edge Pruning does), so the masks start near the full
model; ``init="eap-ig"``: from EAP-IG scores (circuitlab.eap.edge_attribution), log_alpha =
init_logit + init_spread (2 |score| / max |score| - 1), so the edges EAP-IG ranks high start
kept and the rest start nearer the threshold; ``init=tensor``: [R, S] per-edge scores (e.g.
precomputed EAP-IG ones) mapped the same way. The run is deterministic given ``seed`` (the
noise comes from a seeded CPU generator).

Distributed (the runner's ``group``): a training step's masks are one chunk whose gradient must stay in
this process's autograd graph, so every rank trains the same masks on the same noise (EdgeRunner.run
computes masks that require grad whole on each rank); what is split over the ranks is the rest: the
EAP-IG initialisation's gradient passes (circuitlab.eap) and the final circuit's evaluation. Every rank
returns the one-process result, bit for bit; only the writer rank shows progress.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from clikit import Range
from minigpt2.engine import BatchMetric, Metric, batch_metric, check_variant_values
from minigpt2.progress import progress as progress_bar

from .acdc import kl_metric
from .graph import Circuit, EdgeRunner

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1  # hard-concrete temperature and stretch (Louizos et al.; Edge Pruning)
INITS = ("uniform", "eap-ig")


@dataclass
class LearnedMaskResult:
    """A learned-mask circuit and its training run.

    circuit.scores: the final log_alpha [R, S] (0 off the graph); higher = more surely kept.
    faithfulness: the objective's faithfulness term on the discrete circuit (KL to the clean
    logits, or |metric - metric(clean)|); metric_clean / metric_circuit: the metric's values
    (None when no metric was given). history: one dict per step (loss, faithfulness,
    expected_edges, and for target_edges the current target and multipliers).
    """

    circuit: Circuit
    log_alpha: torch.Tensor
    faithfulness: float
    metric_clean: float | None
    metric_circuit: float | None
    seconds: float
    history: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {"faithfulness": self.faithfulness, "metric_clean": self.metric_clean,
                "metric_circuit": self.metric_circuit, "seconds": self.seconds, "steps": len(self.history),
                **self.circuit.node_counts()}


def keep_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z > 0) of hard-concrete masks with logits log_alpha: the expected L0 per edge."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


def deterministic_mask(log_alpha: torch.Tensor) -> torch.Tensor:
    """The noise-free mask clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1); >= 0.5 iff log_alpha >= 0."""
    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def sample_masks(log_alpha: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Hard-concrete samples [V, R, S] from logits [R, S] and uniform noise [V, R, S] in (0, 1)."""
    s = torch.sigmoid((noise.log() - (-noise).log1p() + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def _initial_logits(runner: EdgeRunner, init, metric, init_logit: float, init_spread: float,
                    eap_steps: int, gen: torch.Generator) -> torch.Tensor:
    g = runner.graph
    if isinstance(init, str):
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; choose 'uniform' (every edge at init_logit), 'eap-ig' "
                             "(from EAP-IG scores) or an [R, S] tensor of per-edge scores")
        if init == "uniform":
            jitter = 0.01 * torch.randn(g.n_receivers, g.n_senders, generator=gen, dtype=torch.float64)
            return (init_logit + jitter).float()
        from .eap import edge_attribution
        if metric is None:
            metric = kl_metric(runner.clean.logits)
        scores = edge_attribution(runner, batch_metric(metric), method="eap-ig", steps=eap_steps)
    elif torch.is_tensor(init):
        if init.shape != g.valid.shape:
            raise ValueError(f"init tensor has shape {tuple(init.shape)}; per-edge scores must be "
                             f"[R={g.n_receivers}, S={g.n_senders}]")
        scores = init
    else:
        raise ValueError(f"unknown init {init!r}; choose 'uniform', 'eap-ig' or an [R, S] tensor of per-edge scores")
    mag = scores.detach().cpu().double().abs().masked_fill(~g.valid, 0)
    if not torch.isfinite(mag).all():
        raise ValueError("init scores must be finite")
    top = float(mag.max())
    rel = mag / top if top > 0 else torch.ones_like(mag)
    return (init_logit + init_spread * (2 * rel - 1)).float()


def learn_edge_mask(runner: EdgeRunner, metric: Metric | BatchMetric | None = None, *, target_edges: int | None = None,
                    penalty: float | None = None, steps: int = 200, lr: float = 0.1, init="uniform",
                    init_logit: float = 3.0, init_spread: float = 2.0, eap_steps: int = 5, samples: int = 1,
                    lambda_lr: float = 1.0, warmup: float = 0.5, seed: int = 0,
                    progress: bool = False) -> LearnedMaskResult:
    """Learn hard-concrete edge masks on ``runner``'s batch and ablation (Edge Pruning, see the module).

    Pass exactly one of ``target_edges`` (a circuit of exactly that many edges: the top
    log_alpha after training under Edge Pruning's sparsity target) or ``penalty`` (an L0
    penalty per expected kept edge; the circuit is the edges with mask >= 0.5).

    metric: None (faithfulness = KL to the clean logits), a minigpt2.engine.Metric (the mean over
        examples of |metric - metric(clean)|) or a callable logits [V, B, vocab] -> [V]
        (|metric - metric(clean)|); also what init="eap-ig" scores (KL to the clean logits if None).
    steps, lr: Adam steps and learning rate on log_alpha; samples: masks drawn per step.
    init: "uniform", "eap-ig" or an [R, S] tensor of scores (see the module).
    lambda_lr, warmup: the multipliers' learning rate and the fraction of steps over which the
        target goes from the full graph to target_edges.
    """
    penalty, lr, lambda_lr = _check_args(runner.graph, target_edges, penalty, steps, samples, eap_steps, lr,
                                         lambda_lr, init_logit, init_spread, warmup, metric)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    faith, metric_clean = _faithfulness(runner, metric)
    log_alpha0 = _initial_logits(runner, init, metric, init_logit, init_spread, eap_steps, gen)
    run = _MaskTraining(runner, faith, log_alpha0, gen, steps, samples, lr, lambda_lr, warmup, penalty, target_edges)

    bar = progress_bar(range(steps), desc="edge masks", unit="step", enabled=progress and runner.writer)
    history = []
    for step in bar:
        rec = run.step(step)
        history.append(rec)
        bar.set_postfix(loss=f"{rec['loss']:.4g}", edges=f"{rec['expected_edges']:.1f}")

    final, edges = run.circuit()
    with torch.no_grad():
        logits = runner.run(edges.to(runner.model.dtype)[None])
        faithfulness = float(faith(logits)[0])
        metric_circuit = None if metric is None else float(batch_metric(metric)(logits)[0])
    info = {"method": "edge-pruning", "ablation": runner.ablation, "steps": steps, "lr": lr, "seed": seed,
            "init": init if isinstance(init, str) else "tensor", "samples": samples,
            "objective": "kl" if metric is None else "metric", "faithfulness": faithfulness}
    info.update({"target_edges": target_edges} if target_edges is not None else {"penalty": penalty})
    circuit = Circuit(runner.graph, edges, final, info)
    return LearnedMaskResult(circuit, final, faithfulness, metric_clean, metric_circuit,
                             time.perf_counter() - t0, history)


def _check_args(g, target_edges, penalty, steps, samples, eap_steps, lr, lambda_lr, init_logit, init_spread,
                warmup, metric) -> tuple[float | None, float, float]:
    """learn_edge_mask's arguments checked (a ValueError naming the culprit); returns (penalty, lr,
    lambda_lr) as floats (penalty None when target_edges is given)."""
    if (target_edges is None) == (penalty is None):
        raise ValueError("pass exactly one of target_edges (a circuit of that many edges) or penalty "
                         "(an L0 penalty per kept edge; the circuit keeps masks >= 0.5)")
    if target_edges is not None:
        Range(0, g.n_edges, whole=True).check("target_edges", target_edges, why=f"the graph has {g.n_edges} edges")
    else:
        penalty = float(Range(0).check("penalty", penalty, why="the L0 penalty per kept edge"))
    Range(1, whole=True).check("steps", steps, why="the number of optimisation steps")
    Range(1, whole=True).check("samples", samples, why="masks sampled per step")
    Range(1, whole=True).check("eap_steps", eap_steps, why="EAP-IG interpolation steps")
    lr = float(Range(0, lo_open=True).check("lr", lr))
    lambda_lr = float(Range(0, lo_open=True).check("lambda_lr", lambda_lr))
    Range().check("init_logit", init_logit)
    Range(0).check("init_spread", init_spread)
    Range(0, 1).check("warmup", warmup, why="a fraction of the steps")
    if metric is not None:
        batch_metric(metric)  # a TypeError for what is no metric
    return penalty, lr, lambda_lr


def _faithfulness(runner: EdgeRunner, metric) -> tuple[Callable[[torch.Tensor], torch.Tensor], float | None]:
    """(faith, metric_clean): faith maps masked logits [V, B, vocab] to the objective's faithfulness
    term [V] (see the module); metric_clean is the metric on the clean logits (None without a metric)."""
    with torch.no_grad():
        clean_logits = runner.clean.logits
        if metric is None:
            return kl_metric(clean_logits), None  # KL(clean || masked), mean over examples
        # a Metric is compared example by example (its per-example values), a callable by its batch value
        per_example = metric if isinstance(metric, Metric) else None
        value = check_variant_values(batch_metric(metric)(clean_logits[None]), 1)
        ref = (value if per_example is None else per_example(clean_logits[None])).detach()
        values = batch_metric(metric) if per_example is None else per_example

    def faith(logits):  # [V, B, vocab] -> [V]
        d = (values(logits) - ref.to(logits.device)).abs()
        return d if per_example is None else d.mean(-1)

    return faith, float(value[0])


@dataclass
class _MaskTraining:
    """One Edge Pruning run: log_alpha [R, S] (on the model's device, 0 off the graph) under Adam, and,
    with target_edges, the Lagrange multipliers (lambda_1, lambda_2) under gradient ascent."""

    runner: EdgeRunner
    faith: Callable[[torch.Tensor], torch.Tensor]
    log_alpha0: torch.Tensor  # [R, S] initial logits
    gen: torch.Generator  # the mask noise (seeded, CPU)
    steps: int
    samples: int
    lr: float
    lambda_lr: float
    warmup: float
    penalty: float | None
    target_edges: int | None

    def __post_init__(self):
        g, dev = self.runner.graph, self.runner.model.device
        self.valid = g.valid.to(dev)
        self.n_edges = max(g.n_edges, 1)
        self.log_alpha = self.log_alpha0.masked_fill(~g.valid, 0).to(dev).requires_grad_()
        self.opt = torch.optim.Adam([self.log_alpha], lr=self.lr)
        self.lambdas = torch.zeros(2, device=dev, requires_grad=True)
        self.lam_opt = torch.optim.Adam([self.lambdas], lr=self.lambda_lr, maximize=True) \
            if self.target_edges is not None else None
        self.n_warm = int(round(self.warmup * self.steps))

    def target(self, step: int) -> float:
        """The kept fraction targeted at ``step``: from 1 down to target_edges / n_edges over the warmup."""
        target_frac = self.target_edges / self.n_edges
        if not self.n_warm:
            return target_frac
        return target_frac + (1 - target_frac) * max(0.0, 1 - (step + 1) / self.n_warm)

    def step(self, step: int) -> dict:
        """One optimisation step on ``samples`` sampled masks; returns its history record."""
        g = self.runner.graph
        noise = torch.rand(self.samples, g.n_receivers, g.n_senders, generator=self.gen, dtype=torch.float64)
        noise = noise.clamp(1e-6, 1 - 1e-6).to(self.log_alpha.device, torch.float32)
        z = sample_masks(self.log_alpha, noise) * self.valid
        f = self.runner.run(z.to(self.runner.model.dtype), metric=self.faith).mean()
        expected = (keep_probability(self.log_alpha) * self.valid).sum()
        rec = {"step": step, "faithfulness": float(f.detach()), "expected_edges": float(expected.detach())}
        if self.target_edges is None:
            loss = f + self.penalty * expected
        else:
            t = self.target(step)
            gap = expected / self.n_edges - t
            loss = f + self.lambdas[0] * gap + self.lambdas[1] * gap ** 2
            lam = self.lambdas.detach().tolist()
            rec.update(target_edges=t * self.n_edges, lambda_1=lam[0], lambda_2=lam[1])
            self.lam_opt.zero_grad()
        self.opt.zero_grad()
        loss.backward()
        self.log_alpha.grad.masked_fill_(~self.valid, 0)
        self.opt.step()
        if self.lam_opt is not None:
            self.lam_opt.step()
        rec["loss"] = float(loss.detach())
        return rec

    def circuit(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(final log_alpha [R, S] on the CPU, 0 off the graph; the circuit's edges [R, S] bool): the top
        target_edges by log_alpha, or the edges whose deterministic mask is >= 0.5."""
        valid = self.runner.graph.valid
        final = self.log_alpha.detach().cpu().masked_fill(~valid, 0)
        if self.target_edges is None:
            return final, (final >= 0) & valid  # deterministic mask >= 0.5
        flat = final.double().masked_fill(~valid, -math.inf).flatten()
        edges = torch.zeros(flat.numel(), dtype=torch.bool)
        edges[flat.argsort(descending=True, stable=True)[:self.target_edges]] = True
        return final, edges.view_as(valid)
