"""Exact edge patching: every edge's own effect on the metric, one ablated edge at a time.

For each edge u -> r of circuitlab.graph (the plain graph: 32,491 edges for GPT-2 small, the
EAP-IG / MIB graph),

    score(u -> r) = M(every edge kept but u -> r, which is ablated) - M(clean)

with M the batch mean of the metric and u's output replaced by its ablated value on that edge
only (the runner's ablation: resample, mean or zero). The sign is EAP's (circuitlab.eap:
``(abl_u - out_u) . dM/d in_r`` is the first-order estimate of the same difference): ablating an
edge a higher-is-better metric needs gives a negative score. circuitlab.faithfulness takes these
[R, S] scores as it takes EAP's (``importance_sign`` flips them for a higher-is-better metric);
:func:`edge_patching` makes a Circuit of them, as ``eap()`` does.

Exact, and batched. A variant that ablates one edge into receiver r equals the clean run up to
r's stage, and after it every receiver reads every sender with mask 1, i.e. the ordinary residual
stream. So each variant is computed as:

- the clean run's stage inputs (the residual stream before each head, MLP and the logits), from
  the runner's clean trace, once;
- at r's stage, only r's component: its input minus (out_u - abl_u), through that head (the
  other two of its q, k, v inputs unchanged) or that MLP, or straight into the logits;
- from there on the model's own blocks on the changed residual stream (fused q/k/v projections,
  the last block at the answer positions only: keys and values at every position, the query,
  W_O and the MLP at one), then the logits and the metric.

Every part of the model runs on the runner's engine core (``runner.core``, minigpt2.engine.Core: its
heads, MLPs, blocks, unembedding, chunking and precision rules), as the runner's own forwards do.

Variants are grouped by their stage (edges into late receivers cost little: into the logits,
one unembedding; into layer L-1, one head and the answer positions) and run in chunks sized to
the engine's memory budget (``runner.core.rows``), so no [V, R, S] mask is ever
materialized. The results equal one ``EdgeRunner.trace`` per edge to float rounding (tests/
test_edge_patching.py); bench/bench_edge_patching.py times the two. On a runner with
dtype=torch.bfloat16 the forwards run bf16 matmuls (fp32 residual stream and metric) and the
scores carry bf16's error.

On a runner with a process group (EdgeRunner's ``group``), the chunks (jobs) are split over its ranks,
balanced by their cost (minigpt2.distributed.shard with costs: edges x stages to the logits), and their values gathered, byte for byte, in job order: every rank gets
the one-process scores bit for bit.
"""

from __future__ import annotations

import torch

from minigpt2 import distributed
from minigpt2.engine import batch_metric, check_variant_values, head_mask_bytes_per_row, progress_bar, refuse_hooks
from minigpt2.engine import higher_is_better as metric_direction

from .graph import Circuit, EdgeRunner

__all__ = ["edge_patching_scores", "edge_patching_values", "edge_patching", "plain_edge_patching_scores"]


@torch.no_grad()
def edge_patching_scores(runner: EdgeRunner, metric, edges: torch.Tensor | None = None, *, progress: bool = False,
                         max_rows: int | None = None) -> torch.Tensor:
    """Scores [R, S] (float64, CPU): for every edge, M(that edge ablated) - M(clean).

    Args:
        runner: the batch, its ablation and precision (circuitlab.graph.EdgeRunner).
        metric: a minigpt2.engine.Metric (its batch mean) or ``fn(logits [V, B, vocab]) -> [V]``.
        edges: [R, S] bool, the edges to score (default: all of ``runner.graph``); the others get
            NaN (0 where the graph has no edge).
        progress: a progress bar over the chunks.
        max_rows: examples x variants per chunk (default: the engine's memory budget).
    """
    g = runner.graph
    values = edge_patching_values(runner, metric, edges, progress=progress, max_rows=max_rows)
    clean = _values(batch_metric(metric), runner.clean.logits[None])[0]
    scores = torch.zeros(g.n_receivers, g.n_senders, dtype=torch.float64)
    chosen = _check_edges(g, edges)
    scores[g.valid & ~chosen] = float("nan")
    scores[chosen] = values[chosen] - clean
    return scores


@torch.no_grad()
def edge_patching_values(runner: EdgeRunner, metric, edges: torch.Tensor | None = None, *, progress: bool = False,
                         max_rows: int | None = None) -> torch.Tensor:
    """M(edge ablated) [R, S] (float64, CPU) for the chosen edges (see :func:`edge_patching_scores`), NaN elsewhere."""
    model, g = runner.model, runner.graph
    refuse_hooks(model, "edge patching")
    metric = batch_metric(metric)
    chosen = _check_edges(g, edges)
    B, T = runner.tokens.shape
    per_chunk = max(1, runner.core.rows(head_mask_bytes_per_row(model.cfg, T), at_least=B, max_rows=max_rows) // B)
    per_chunk = distributed.smallest(per_chunk, runner.group)  # the ranks agree on one job list
    plan = _Plan(runner)
    jobs = []  # (stage, [(r, u), ...]) chunks, each within one stage; latest stages first (cheapest)
    for i in reversed(range(len(g.stages))):
        st = g.stages[i]
        pairs = [(r, u) for r in st.rows for u in range(st.n_in) if chosen[r, u]]
        if st.kind == "attn":  # the same head's edges together: one head computed per sub-batch
            H = g.n_head
            pairs.sort(key=lambda e: ((e[0] - st.rows.start) % H, e[0], e[1]))
        jobs += [(i, pairs[c:c + per_chunk]) for c in range(0, len(pairs), per_chunk)]
    # distributed: the jobs shared by their cost (an edge's run goes from its stage to the logits; attention
    # stages hold most edges, so turn by turn would give one rank nearly all of them), gathered exactly
    costs = [len(pairs) * (len(g.stages) - i) for i, pairs in jobs]
    with runner.core.precision():  # each job's values [n], of the logits [n, B, vocab], in the model's dtype
        outputs = distributed.share(len(jobs), lambda j: _values(metric, plan.run(*jobs[j])), runner.group,
                                    "edge patching", model.device, costs,
                                    wrap=lambda mine: progress_bar(mine, "edge patching", "chunk",
                                                                   progress and runner.writer))
    out = torch.full((g.n_receivers, g.n_senders), float("nan"), dtype=torch.float64)
    for j, (i, pairs) in enumerate(jobs):
        r_idx, u_idx = zip(*pairs)
        out[list(r_idx), list(u_idx)] = outputs[j].double().cpu()
    return out


def edge_patching(runner: EdgeRunner, metric, top_k: int | None = None, threshold: float | None = None,
                  progress: bool = False, higher_is_better: bool | None = None) -> Circuit:
    """The top-k edges by |score| (or those with |score| >= threshold), as ``circuitlab.eap.eap`` does;
    the circuit's ``scores`` hold every edge's score."""
    from .eap import threshold_circuit, top_k_circuit

    if (top_k is None) == (threshold is None):
        raise ValueError("pass exactly one of top_k (keep the k highest |scores|) or threshold (keep |score| >= it)")
    scores = edge_patching_scores(runner, metric, progress=progress)
    info = {"method": "edge-patching", "ablation": runner.ablation,
            "higher_is_better": metric_direction(metric, True if higher_is_better is None else higher_is_better)}
    if top_k is not None:
        return top_k_circuit(runner.graph, scores, top_k, info)
    return threshold_circuit(runner.graph, scores, threshold, info)


@torch.no_grad()
def plain_edge_patching_scores(runner: EdgeRunner, metric, edges: torch.Tensor | None = None) -> torch.Tensor:
    """The same scores by the plain loop: one full ``runner.trace`` per edge (for checks and timing)."""
    g = runner.graph
    metric = batch_metric(metric)
    chosen = _check_edges(g, edges)
    clean = _values(metric, runner.clean.logits[None])[0]
    scores = torch.zeros(g.n_receivers, g.n_senders, dtype=torch.float64)
    scores[g.valid & ~chosen] = float("nan")
    ones = g.ones(runner.model.dtype)
    for r, u in chosen.nonzero().tolist():
        mask = ones.clone()
        mask[r, u] = 0
        scores[r, u] = _values(metric, runner.trace(mask).logits[None])[0] - clean
    return scores


def _check_edges(g, edges) -> torch.Tensor:
    if edges is None:
        return g.valid.clone()
    edges = torch.as_tensor(edges).cpu()
    if edges.shape != g.valid.shape:
        raise ValueError(f"edges must be a [R={g.n_receivers}, S={g.n_senders}] bool mask of the edges to score, "
                         f"got {tuple(edges.shape)}")
    return edges.bool() & g.valid


def _values(metric, logits: torch.Tensor) -> torch.Tensor:
    return check_variant_values(metric(logits), logits.shape[0]).detach().double().cpu()


class _Plan:
    """The clean run's stage inputs and sender outputs, and the forward of single-edge variants, on the
    runner's engine core."""

    def __init__(self, runner: EdgeRunner):
        self.runner, self.core, self.g = runner, runner.core, runner.graph
        B, T = runner.tokens.shape
        D, abl = runner.clean.effect, runner.ablated  # [S, B, T, d], [S, B | 1, T | 1, d]
        self.D, self.D_at = D, runner.clean.effect_at
        # the clean residual stream entering each stage (all masks 1), as the runner's trace sums it
        cum = torch.cat([torch.zeros_like(D[:1]), D.cumsum(0)])  # [S + 1, B, T, d]
        self.x = [(runner.floor[i] + cum[st.n_in]).expand(B, T, -1) for i, st in enumerate(self.g.stages)]
        self.x_at = [runner.at(x) for x in self.x]  # [B, d]
        self.out = D + abl  # each sender's clean output [S, B, T, d]

    def run(self, i: int, pairs: list[tuple[int, int]]) -> torch.Tensor:
        """Logits [n, B, vocab] of the variants that ablate edge u -> r (each (r, u) in ``pairs``, all
        receivers of stage i)."""
        st = self.g.stages[i]
        us = torch.tensor([u for _, u in pairs], device=self.D.device)
        if st.kind == "logits":
            return self.core.logits(self.x_at[i][None] - self.D_at[us])  # [n, B, vocab]
        if st.kind == "mlp":
            return self._mlp(i, us)
        return self._heads(i, pairs, us)

    def _mlp(self, i: int, us: torch.Tensor) -> torch.Tensor:
        """Edges u -> m{l} (``us``: their senders): MLP l on its input less each edge's effect, then the rest."""
        core, st, runner = self.core, self.g.stages[i], self.runner
        n, (B, T) = len(us), runner.tokens.shape
        mlp_out = self.out[st.outs.start]  # [B, T, d]
        if st.layer == self.g.n_layer - 1:  # only the answer positions reach the logits
            new = core.mlp(st.layer, self.x_at[i][None] - self.D_at[us])  # [n, B, d]
            return core.logits(self.x_at[i + 1][None] + new - runner.at(mlp_out)[None])
        new = core.mlp(st.layer, self.x[i][None] - self.D[us])  # [n, B, T, d]
        resid = self.x[i + 1][None] + new - mlp_out[None]  # entering layer l + 1
        return self._rest(st.layer + 1, resid.reshape(n * B, T, -1), n)

    def _heads(self, i: int, pairs: list[tuple[int, int]], us: torch.Tensor) -> torch.Tensor:
        """Edges u -> a{l}.h{h}<q|k|v>: each head recomputed alone, per run of the same head in ``pairs``
        (sorted so), on its one changed input; then the MLP and the rest."""
        core, st, runner = self.core, self.g.stages[i], self.runner
        n, (B, T), H = len(pairs), runner.tokens.shape, self.g.n_head
        local = [r - st.rows.start for r, _ in pairs]
        heads, kinds = [j % H for j in local], torch.tensor([j // H for j in local], device=self.D.device)
        delta = self.D.new_empty(n, B, T, self.D.shape[-1])  # each variant's change of its head's output
        start = 0
        while start < n:
            h, stop = heads[start], start
            while stop < n and heads[stop] == h:
                stop += 1
            k = stop - start
            base = self.x[i][None].expand(k, B, T, -1)
            xq, xk, xv = (base - (kinds[start:stop] == kind).view(k, 1, 1, 1).to(self.D.dtype)
                          * self.D[us[start:stop]] for kind in range(3))  # one of them less the edge's effect
            new = core.heads(st.layer, *(x.reshape(k * B, T, 1, -1) for x in (xq, xk, xv)), [h], core.mask(k))
            delta[start:stop] = new[:, :, 0].view(k, B, T, -1) - self.out[st.outs.start + h][None]
            start = stop
        if st.layer == self.g.n_layer - 1:  # resid_mid at the answer positions, the MLP there, then the logits
            return core.logits(core.finish_mlp(st.layer, self.x_at[i + 1][None] + runner.at(delta)))
        mid = self.x[i + 1][None] + delta  # resid_mid: the MLP's input
        return self._rest(st.layer + 1, core.finish_mlp(st.layer, mid.reshape(n * B, T, -1)), n)

    def _rest(self, layer: int, x: torch.Tensor, n: int) -> torch.Tensor:
        """Blocks ``layer``.. on the residual stream x [n * B, T, d], the last at the answer positions only,
        then the logits: [n, B, vocab]."""
        return self.core.logits(self.core.rest(layer, x, n)).view(n, self.runner.tokens.shape[0], -1)
