"""Edge attribution patching: EAP (Syed et al. 2023), EAP-IG on inputs and on activations, and
clean-corrupted (Hanna et al. 2024; the methods of hannamw/EAP-IG that MIB compares).

EAP scores every edge u -> r of circuitlab.graph by the first-order change of the
metric when the edge is ablated:

    score(u -> r) = (abl_u - out_u) . dM/d in_r        (summed over examples, positions, d_model)

from one clean forward and backward (the ablated values come from the runner's one
corrupted forward). A positive score means ablating the edge raises the metric M (the
batch mean of a :class:`minigpt2.engine.Metric`, or a callable logits [V, B, vocab] -> [V]).

EAP-IG (Hanna et al.'s EAP-IG-inputs) replaces the gradient by its average over ``steps``
points on the straight line from the ablated input embedding to the clean one,
x(alpha) = abl_input + alpha (x - abl_input), with alpha = k / steps for k in the ``rule``'s range:

    rule="mib" (EAP-IG's  k = 0 .. steps - 1: the corrupted end in, the clean end out. The rule of
    default, rule=None)   hannamw/EAP-IG's ``get_scores_eap_ig`` (src/eap/attribute.py,
                          ``for step in range(0, steps)``) since commit 13c0033 (February 2025),
                          and of the EAP-IG commit that MIB (hannamw/MIB-circuit-track) pins, 7af394a.
    rule="hanna2024"      k = 1 .. steps: the clean end in, the corrupted end out; the rule of that
                          code before February 2025 (Hanna et al. 2024's release), and still of its
                          node-level EAP-IG (src/eap/attribute_node.py) and of its EAP-IG-activations
                          (below, whose default it is). steps=1 is plain EAP.

Both are Riemann sums of the same integral and agree as steps grows (held against the
reference, the old rule's scores rank like its current ones with Spearman 0.91 at steps = 5
and 0.99 at steps = 20).

Where these numbers differ from the reference's (hannamw/EAP-IG, which MIB uses):

- scale: the reference divides its scores by the number of examples (``scores /= total_items``,
  on the gradient of a batch-mean metric), so its scores are those here divided by B when its
  dataloader holds the B examples in one batch (divided by its batch size b in general).
  ``scale="reference"`` divides by B; the default ``scale="metric"`` keeps the first-order
  change of the metric (comparable with finite differences, ACDC's effects and the exact head
  sweep). Rankings, and so circuits and MIB's faithfulness, are the same either way. The
  reference's MIB runs also attribute a loss (``loss=True``: minus the logit difference), which
  flips the sign: see circuitlab.faithfulness and circuitlab.mib for the conversion.
- the input node: here it is the token plus the position embedding; the reference's is the
  token embedding alone (``hook_embed``), and position embeddings are never ablated there.
  Under resample ablation (the reference's "patching") the two agree exactly, since clean and
  corrupted prompts share positions; under mean ablation per position (the reference's
  "mean-positional") too, when every row has the same positions; under zero ablation they
  differ (here the position embedding is zeroed as well), in the input node's scores only. The
  reference supports EAP-IG-inputs under patching only.
- evaluation: the reference prunes a circuit (drops nodes with no incoming or no outgoing edge,
  then their edges, to a fixed point) before it measures it; under mean or zero ablation that
  changes the value. circuitlab.faithfulness does the same, by name.

EAP-IG on activations (``method="eap-ig-activations"``; hannamw/EAP-IG's "EAP-IG-activations",
``get_scores_ig_activations`` in src/eap/attribute.py, unchanged from the commit MIB pins, 7af394a,
to the current one) interpolates at the components' outputs instead of at the input embedding.
The reference takes, in turn, each of the 1 + 2L "layer nodes" n of its loop (the input node, all
heads of layer l together, MLP l) and, for each alpha, runs the clean prompts with n's output
replaced by the constant abl_n + alpha (out_n - abl_n) (a forward hook that returns a tensor
detached from the model: no gradient flows into n or through it); every edge's score then takes
the gradient at every receiver in every one of these runs, averaged over all (1 + 2L) x steps runs:

    score(u -> r) = mean over (n, alpha) of (abl_u - out_u) . dM/d in_r |_(n interpolated, held constant)

Here a run is the edge graph with n's out-edges at mask alpha, the same forward (n's inputs are
clean, so its output is out_n); the gradient that would flow back through n is taken out again
by one vector-Jacobian product through n's outputs, so the receivers upstream of n (n's own
inputs get exactly 0) see the gradient of the reference's frozen-n run. The reference's rule here
is k = 1..steps (``for step in range(1, steps+1)``, the "hanna2024" rule, and this method's default);
cost: (1 + 2L) x steps forwards and twice as many backwards. Where these differ from the reference:
under mean ablation (and its "optimal" one) the reference interpolates from 0, not from the mean
(its ``activations_corrupted`` is never filled then) while it still multiplies by mean - clean; here
the path starts at the ablated value under every ablation. Under zero ablation the input node
differs as above (here token + position); with no position embedding the two agree exactly.

Clean-corrupted (``method="clean-corrupted"``; ``get_scores_clean_corrupted``, same file) averages
the gradient at the two ends of EAP-IG's path only: the clean input and the ablated one (under
resample ablation the corrupted run, the reference's only intervention for it; under mean or zero
ablation, here, the ablated input embedding that EAP-IG starts from): two forwards and backwards,
(EAP + EAP-IG with steps=1, rule "mib") / 2.

Head attribution does the same for the n_layer x n_head head masks of
minigpt2.masking: score(l, h) = (r_h - z_h) . dM/dz_h, the first-order change of the
metric when head h's z is replaced by r_h (zero, mean or corrupted z), from one
forward and one backward of the plain model (steps of each for EAP-IG, with the same rules).

Circuits come from the scores by top-k or by threshold on |score|.

A metric that is at its optimum on the clean run, like the KL divergence to it, has zero
gradient there: plain EAP scores are then rounding noise, and EAP-IG (whose path starts at
the ablated input) or a task metric such as a logit difference is needed.
"""

from __future__ import annotations

import math

import torch

from clikit import Range
from minigpt2 import distributed
from minigpt2.engine import (BatchMetric, Metric, batch_metric, check_ablation, check_batch, check_model,
                             check_variant_values)
from minigpt2.masking import last_positions, replacement_values
from minigpt2.model import GPT2
from minigpt2.progress import progress as progress_bar

from .graph import Circuit, EdgeRunner, Graph, check_runner

METHODS = ("eap", "eap-ig", "eap-ig-activations", "clean-corrupted")
IG_METHODS = ("eap-ig", "eap-ig-activations")  # the methods that take steps and a rule
IG_RULES = ("mib", "hanna2024")  # alpha = k / steps for k = 0..steps-1, or k = 1..steps
# rule=None: the reference's rule for the method (hannamw/EAP-IG, src/eap/attribute.py: get_scores_eap_ig
# loops range(0, steps), get_scores_ig_activations range(1, steps + 1))
DEFAULT_RULES = {"eap-ig": "mib", "eap-ig-activations": "hanna2024"}
SCALES = ("metric", "reference")


def check_method(method: str, steps: int) -> int:
    """The number of gradient points per run of the method (steps for the EAP-IG methods)."""
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose 'eap' (one gradient at the clean input), "
                         "'eap-ig' (gradients averaged along the path from the ablated input), 'eap-ig-activations' "
                         "(interpolating each layer's outputs in turn) or 'clean-corrupted' (the gradients at the "
                         "clean and the ablated input, averaged)")
    if method == "eap":
        return 1
    if method == "clean-corrupted":
        return 2
    return Range(1, whole=True).check("steps", steps, why="EAP-IG's interpolation steps, e.g. 5")


def ig_alphas(steps: int, rule: str = "mib") -> list[float]:
    """The interpolation points alpha (0: the ablated input, 1: the clean one) of EAP-IG.

    "mib": k / steps for k = 0..steps-1 (hannamw/EAP-IG since February 2025, as MIB runs it);
    "hanna2024": k / steps for k = 1..steps (its earlier rule).
    """
    if rule not in IG_RULES:
        raise ValueError(f"unknown EAP-IG rule {rule!r}; choose 'mib' (alpha = k/steps, k = 0..steps-1, "
                         "hannamw/EAP-IG's and MIB's rule since February 2025) or 'hanna2024' (k = 1..steps)")
    first = 0 if rule == "mib" else 1
    return [k / steps for k in range(first, first + steps)]


def resolve_rule(method: str, rule: str | None) -> str:
    """The interpolation rule a method runs with: ``rule``, or for None the reference's for the method
    ("mib", k = 0..steps-1, for eap-ig; "hanna2024", k = 1..steps, for eap-ig-activations)."""
    rule = DEFAULT_RULES.get(method, "mib") if rule is None else rule
    ig_alphas(1, rule)  # checks the rule's name for every method
    return rule


def _alphas(method: str, steps: int, rule: str | None) -> list[float | None]:
    """None: the clean input (plain EAP); clean-corrupted: the clean and the ablated end."""
    steps = check_method(method, steps)
    alphas = ig_alphas(steps, resolve_rule(method, rule))
    if method == "eap":
        return [None]
    return [None, 0.0] if method == "clean-corrupted" else alphas


def _check_scale(scale: str) -> str:
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose 'metric' (the first-order change of the metric) or "
                         "'reference' (divided by the number of examples, as hannamw/EAP-IG)")
    return scale


def _scalar(metric, logits: torch.Tensor) -> torch.Tensor:
    return check_variant_values(metric(logits[None]), 1)[0]


def edge_attribution(runner: EdgeRunner, metric: Metric | BatchMetric, method: str = "eap", steps: int = 5,
                     rule: str | None = None, scale: str = "metric", *, max_rows: int | None = None,
                     progress: bool = False) -> torch.Tensor:
    """Scores [R, S] for every edge of ``runner.graph`` (0 where there is no edge).

    metric: a :class:`minigpt2.engine.Metric` (its batch mean is attributed) or a callable
    logits [V, B, vocab] -> [V]. method "eap": one forward and backward of the edge graph at the
    clean input. "eap-ig": ``steps`` of them along the path from the ablated input embedding, at
    the points of ``rule`` ("mib": k = 0..steps-1, this method's default; or "hanna2024": k = 1..steps;
    see the module's docstring). "eap-ig-activations": (1 + 2 n_layer) x ``steps`` of them, each
    layer node's outputs interpolated in turn (default rule "hanna2024", the reference's).
    "clean-corrupted": two, at the clean and the ablated input. rule=None: the method's reference
    rule (:func:`resolve_rule`). scale "metric" (default): the first-order change of the metric
    (averaged over the method's gradient points); "reference": divided by the number of examples,
    as hannamw/EAP-IG reports its scores. Every method's score is the metric's change when the
    edge is ablated (EAP's sign: negative for a needed edge of a higher-is-better metric).

    Memory: a differentiated trace keeps its activations for the backward pass (about 45 MB an
    example on the bundled models); examples are taken ``max_rows`` at a time (default: what the
    memory budget allows, EdgeRunner.grad_rows), the metric's gradient at the logits coming from one
    forward of the whole batch, so the scores are those of the whole batch at once (to float
    rounding; bit for bit when one chunk holds it). ``progress``: a bar (or log lines) over the
    forward and backward passes (on the writer rank).

    Distributed (the runner's ``group``): the passes (a chunk of examples at one gradient point) are split
    over the ranks and their gradients added in the one-process order, so every rank returns the
    one-process scores bit for bit (on CPU; on CUDA with ``max_rows`` pinned, as for any chunked run).
    """
    check_runner(runner, "edge_attribution")
    alphas = _alphas(method, steps, rule)
    scale = _check_scale(scale)
    metric = batch_metric(metric)
    g, model = runner.graph, runner.model
    chunks = _example_chunks(runner, max_rows)
    runs = len(alphas) * (len(layer_nodes(g)) if method == "eap-ig-activations" else 1)
    with progress_bar(total=runs * len(chunks), desc=f"{method} gradients", unit="pass",
                      enabled=progress and runner.writer) as bar:
        if method == "eap-ig-activations":
            grads = _activation_gradients(runner, metric, alphas, chunks, bar)
        else:
            grads = _input_gradients(runner, metric, alphas, chunks, bar)
    scores = torch.zeros(g.n_receivers, g.n_senders, dtype=model.dtype, device=model.device)
    D = runner.clean.effect  # out_u - abl_u  [S, B, T, d]
    for st, grad in zip(g.stages, grads):
        eff = runner.clean.effect_at if st.kind == "logits" else D
        # (abl_u - out_u) . mean gradient of in_r
        scores[st.rows.start:st.rows.stop, :st.n_in] = -torch.einsum("r...,u...->ru", grad, eff[:st.n_in])
    if scale == "reference":
        scores = scores / runner.tokens.shape[0]
    return scores.detach()


def _example_chunks(runner: EdgeRunner, max_rows: int | None) -> list[slice]:
    """The batch's examples in the fewest chunks of even sizes, at most ``max_rows`` (default: what the memory
    budget allows, EdgeRunner.grad_rows) each; with a group, the chunks every rank agrees on (the smallest)."""
    B = runner.tokens.shape[0]
    per = max(1, min(B, max_rows if max_rows is not None else runner.grad_rows()))
    per = distributed.smallest(per, runner.group)
    per = math.ceil(B / math.ceil(B / per))  # the fewest chunks, of even sizes
    return [slice(i, min(B, i + per)) for i in range(0, B, per)]


def _gradient_sum(runner: EdgeRunner, metric: BatchMetric, runs: list, chunks: list[slice], bar) -> list[torch.Tensor]:
    """The sum over ``runs`` of each run's gradients per stage ([R_st, B, (T,) d] each), chunk of examples
    by chunk; each run a pair (forward, backward).

    ``forward(sub, rows)``: the run's trace on the runner ``sub`` of examples ``rows``; ``backward(sub,
    trace, scalar)``: its gradients, of ``scalar(trace.logits)``. One chunk: the metric itself. Several:
    dM/dlogits from one forward of the whole batch without autograd, then each chunk's backward of
    sum(logits * dM/dlogits), the same vector-Jacobian product (an example's forward reads its own row).
    Added in place, run by run and chunk by chunk, so that no run's gradients are held beside the sum
    (0 + x is x exactly; the sums of adding them up one by one). With the runner's group, the (run, chunk)
    passes are split over its ranks, a pass per rank at a time, and every rank adds every pass's gradients,
    gathered byte for byte, in this same order: the one-process sum, bit for bit (no sum crosses ranks).
    """
    B = runner.tokens.shape[0]
    items = [(k, rows) for k in range(len(runs)) for rows in chunks]
    cache: dict = {}  # the current run's dM/dlogits (several chunks)

    def compute(i: int) -> list[torch.Tensor]:
        k, rows = items[i]
        return _chunk_gradients(runner, metric, runs[k], k, rows, len(chunks) == 1, cache)

    grads: list[torch.Tensor] = []
    for i, step in distributed.in_order(len(items), compute, runner.group, "gradient passes", runner.model.device):
        rows = items[i][1]
        if not grads:
            grads += [x.new_zeros(x.shape[0], B, *x.shape[2:]) for x in step]
        for total, x in zip(grads, step):
            total[:, rows] += x
        del step
        bar.update()
    return grads


def _chunk_gradients(runner: EdgeRunner, metric: BatchMetric, run, k: int, rows: slice, whole: bool,
                     cache: dict) -> list[torch.Tensor]:
    """Run k's gradients per stage on the examples ``rows`` (``whole``: the batch's one chunk, the metric
    itself; else the vector-Jacobian product with run k's dM/dlogits, computed once per run in ``cache``)."""
    forward, backward = run
    if whole:
        sub, scalar = runner, (lambda logits: _scalar(metric, logits))
    else:
        if cache.get("run") != k:
            cache.clear()
            with torch.no_grad():
                logits = forward(runner, slice(0, runner.tokens.shape[0])).logits.detach().requires_grad_()
            with torch.enable_grad():
                cache.update(run=k, dlogits=torch.autograd.grad(_scalar(metric, logits), logits)[0])  # [B, vocab]
        sub, g = runner.select(rows), cache["dlogits"][rows]
        scalar = (lambda logits: (logits * g).sum())
    with torch.enable_grad():
        return [x.detach() for x in backward(sub, forward(sub, rows), scalar)]


def _input_gradients(runner: EdgeRunner, metric: BatchMetric, alphas: list[float | None], chunks: list[slice],
                     bar) -> list[torch.Tensor]:
    """The mean over ``alphas`` of dM/d in_r per stage, with the input embedding at abl + alpha (x - abl)
    (None: the clean input)."""
    model = runner.model
    ones = runner.graph.ones(model.dtype).to(model.device)
    with torch.no_grad():
        clean_embed = model.embed_input(runner.tokens, attention_mask=runner.attention_mask)
        abl_embed = runner.ablated[0].expand_as(clean_embed)

    def backward(sub, tr, scalar):
        return torch.autograd.grad(scalar(tr.logits), tr.inputs)

    runs = []
    for alpha in alphas:
        embed = None if alpha is None else abl_embed + alpha * (clean_embed - abl_embed)

        def forward(sub, rows, embed=embed):
            return sub.trace(ones, embed=None if embed is None else embed[rows], keep_inputs=torch.is_grad_enabled())

        runs.append((forward, backward))
    return [grad.div_(len(alphas)) for grad in _gradient_sum(runner, metric, runs, chunks, bar)]


def layer_nodes(graph: Graph) -> list[range]:
    """The sender groups that EAP-IG-activations interpolates in turn, in the reference's order: the
    input, then per layer all its heads together and its MLP (hannamw/EAP-IG's ``nodeslist`` of
    graph.nodes['input'], 'a{l}.h0' (out_hook attn.hook_result, every head) and 'm{l}')."""
    return [range(0, 1)] + [st.outs for st in graph.stages if st.kind != "logits"]


def _activation_gradients(runner: EdgeRunner, metric: BatchMetric, alphas: list[float], chunks: list[slice],
                          bar) -> list[torch.Tensor]:
    """EAP-IG-activations' mean over layer nodes n and ``alphas`` of dM/d in_r per stage, with n's
    outputs held at abl_n + alpha (out_n - abl_n) and no gradient through n (see the module's docstring).

    A run is the clean edge graph with n's out-edges at mask alpha: the forward of the reference's
    run, since n's own inputs are clean. Autograd's gradient at a receiver upstream of n includes the
    path through n's outputs; that part, the vector-Jacobian product of n's effects with c_u = dM/dD_u
    = sum_r m_ru dM/d in_r (in_r is linear in D_u = out_u - abl_u with weight m_ru), is subtracted;
    n's own stage reads only into n, so its gradient is 0.
    """
    g, model = runner.graph, runner.model
    ones = g.ones(model.dtype).to(model.device)
    runs = []
    for group in layer_nodes(g):
        cols = list(group)
        own = next((i for i, st in enumerate(g.stages) if st.outs == group), None)  # the stage computing n
        upstream = [i for i, st in enumerate(g.stages) if st.n_in <= group.start and i != own]
        for alpha in alphas:
            mask = ones.clone()
            mask[:, cols] = mask[:, cols] * alpha

            def forward(sub, rows, mask=mask):
                return sub.trace(mask, keep_inputs=torch.is_grad_enabled())

            def backward(sub, tr, scalar, mask=mask, cols=cols, own=own, upstream=upstream, group=group):
                step = list(torch.autograd.grad(scalar(tr.logits), tr.inputs, retain_graph=bool(upstream)))
                if own is not None:
                    step[own] = torch.zeros_like(step[own])
                if upstream:
                    rows = torch.arange(sub.tokens.shape[0], device=model.device)
                    c = torch.zeros_like(tr.effect[cols])  # [n, B, T, d]: dM/dD_u for u in the node
                    for st, grad in zip(g.stages, step):
                        if st.n_in <= group.start:
                            continue
                        w = mask[st.rows.start:st.rows.stop, cols]  # [R_st, n]
                        if st.kind == "logits":
                            c[:, rows, sub.positions] += torch.einsum("rn,rbd->nbd", w, grad)
                        else:
                            c += torch.einsum("rn,rbtd->nbtd", w, grad)
                    via = torch.autograd.grad(tr.effect[cols], [tr.inputs[i] for i in upstream], grad_outputs=c,
                                              allow_unused=True)
                    for i, v in zip(upstream, via):
                        if v is not None:
                            step[i] = step[i] - v
                return [s.detach() for s in step]

            runs.append((forward, backward))
    return [grad.div_(len(runs)) for grad in _gradient_sum(runner, metric, runs, chunks, bar)]


def head_attribution(model: GPT2, tokens: torch.Tensor, metric: Metric | BatchMetric, method: str = "eap",
                     steps: int = 5, ablation: str = "resample", corrupted: torch.Tensor | None = None,
                     reference: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                     reference_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                     rule: str | None = None, group=None) -> torch.Tensor:
    """Scores [n_layer, n_head]: the first-order change of the metric when each head is ablated
    (its z replaced, as ``run_with_head_masks`` does), all from one forward and backward per step.

    Arguments as for :class:`circuitlab.graph.EdgeRunner` (``group``: the gradient points split over its
    ranks, the one-process scores bit for bit on every rank); ``rule`` as for :func:`edge_attribution`
    (its default for eap-ig, "mib", keeps a head's score the sum of its out-edges' scores; hannamw/EAP-IG's
    node-level EAP-IG, src/eap/attribute_node.py, uses "hanna2024"). Compare with the exact sweep
    ``circuitlab.compare.exact_head_effects``. Methods "eap", "eap-ig" and "clean-corrupted"
    (EAP-IG-activations is edge-level only).
    """
    if method == "eap-ig-activations":
        raise ValueError("method 'eap-ig-activations' interpolates the edge graph's layer nodes and is "
                         "available for edges only (edge_attribution); heads take 'eap', 'eap-ig' or "
                         "'clean-corrupted'")
    alphas = _alphas(method, steps, rule)
    metric = batch_metric(metric)
    ablation = check_ablation(ablation)
    check_model(model, "head_attribution")
    tokens = check_batch(model, tokens)
    attention_mask = model.check_attention_mask(attention_mask, tokens)
    B, T = tokens.shape
    positions = last_positions(tokens, attention_mask) if positions is None else positions
    if ablation == "resample" and corrupted is None:
        raise ValueError("ablation='resample' needs corrupted=[B, T] prompts paired with the clean ones")
    ref = corrupted if ablation == "resample" else reference
    r = replacement_values(model, ablation, tokens, None if ref is None else torch.as_tensor(ref).to(model.device),
                           attention_mask, reference_mask)  # per layer, or None (zero)
    L = model.cfg.n_layer
    z_names = [f"blocks.{l}.attn.hook_z" for l in range(L)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names=["hook_embed", "hook_pos_embed"] + z_names,
                                        attention_mask=attention_mask)
        tok_abl, pos_abl = _ablated_embeddings(model, ablation, tokens, ref, attention_mask, reference_mask, cache)
    grads = [torch.zeros_like(cache[n]) for n in z_names]

    def compute(k: int) -> list[torch.Tensor]:  # dM/dz per layer at alphas[k]
        alpha = alphas[k]
        probes = [torch.zeros_like(g, requires_grad=True) for g in grads]  # dM/dprobe = dM/dz
        hooks = [(n, lambda z, hp, p=p: z + p) for n, p in zip(z_names, probes)]
        if alpha is not None:
            hooks += [("hook_embed", lambda x, hp, a=alpha: tok_abl + a * (x - tok_abl)),
                      ("hook_pos_embed", lambda x, hp, a=alpha: pos_abl + a * (x - pos_abl))]
        with torch.enable_grad():
            logits = model.run_with_hooks(tokens, attention_mask=attention_mask, positions=positions, fwd_hooks=hooks)
            return list(torch.autograd.grad(_scalar(metric, logits), probes))

    # the gradient points split over the group's ranks, added here in their order (the one-process sum)
    for _, step in distributed.in_order(len(alphas), compute, distributed.resolve_group(group),
                                        "head attribution passes", model.device):
        grads = [a + b for a, b in zip(grads, step)]
    return _head_scores([cache[n] for n in z_names], r, [g / len(alphas) for g in grads])


def _head_scores(zs: list[torch.Tensor], r, grads: list[torch.Tensor]) -> torch.Tensor:
    """[n_layer, n_head]: (r_h - z_h) . dM/dz_h per layer (zs, grads [B, T, H, d_head]; r: the replacements or
    None for zero)."""
    scores = []
    for l, z in enumerate(zs):
        rl = torch.zeros_like(z) if r is None else r[l].expand_as(z)
        scores.append(torch.einsum("bthe,bthe->h", rl - z, grads[l]))
    return torch.stack(scores).detach()


def _ablated_embeddings(model, ablation, tokens, ref, attention_mask, reference_mask, cache):
    """The token and position embeddings that EAP-IG starts from: corrupted, mean or zero."""
    tok, pos = cache["hook_embed"], cache["hook_pos_embed"]
    if ablation == "zero":
        return torch.zeros_like(tok), torch.zeros_like(pos)
    if ablation == "resample":
        return model.wte(torch.as_tensor(ref).to(model.device)), pos
    ref, ref_mask = (tokens, attention_mask) if ref is None else (torch.as_tensor(ref).to(model.device), reference_mask)
    w = torch.ones(ref.shape, device=model.device) if ref_mask is None else ref_mask.to(model.device).to(tok.dtype)
    mean = (model.wte(ref) * w[..., None]).sum(0) / w.sum(0).clamp(min=1)[:, None]  # [T, d]
    return mean.expand_as(tok), pos


def top_k_circuit(graph: Graph, scores: torch.Tensor, k: int, info: dict | None = None) -> Circuit:
    """The k edges with the largest |score|."""
    Range(0, graph.n_edges, whole=True).check("k", k, why="the graph's edge count")
    flat = scores.detach().abs().cpu().double().masked_fill(~graph.valid, -1).flatten()
    edges = torch.zeros(graph.valid.numel(), dtype=torch.bool)
    edges[flat.argsort(descending=True, stable=True)[:k]] = True
    return Circuit(graph, edges.view_as(graph.valid), scores.detach().cpu(), dict(info or {}, top_k=k))


def threshold_circuit(graph: Graph, scores: torch.Tensor, threshold: float, info: dict | None = None) -> Circuit:
    """The edges with |score| >= threshold."""
    Range(0).check("threshold", threshold, why="edges with |score| >= threshold are kept")
    edges = scores.detach().abs().cpu() >= threshold
    return Circuit(graph, edges, scores.detach().cpu(), dict(info or {}, threshold=threshold))


def eap(runner: EdgeRunner, metric: Metric | BatchMetric, method: str = "eap", steps: int = 5,
        top_k: int | None = None, threshold: float | None = None, rule: str | None = None,
        scale: str = "metric", *, max_rows: int | None = None, progress: bool = False) -> Circuit:
    """Score every edge (:func:`edge_attribution`, with its ``rule``, ``scale``, ``max_rows`` and
    ``progress``) and keep the top
    k (or those with |score| >= threshold); the circuit's ``scores`` hold all edge scores, and its
    ``info`` the method, steps (gradient points per run: 1 for eap, 2 for clean-corrupted), rule
    (the EAP-IG methods', as resolved), scale and ablation."""
    if (top_k is None) == (threshold is None):
        raise ValueError("pass exactly one of top_k (keep the k highest |scores|) or threshold (keep |score| >= it)")
    scores = edge_attribution(runner, metric, method, steps, rule=rule, scale=scale, max_rows=max_rows,
                              progress=progress)
    info = {"method": method, "steps": check_method(method, steps), "ablation": runner.ablation, "scale": scale}
    if method in IG_METHODS:
        info["rule"] = resolve_rule(method, rule)
    if isinstance(metric, Metric):  # the direction of the scores, for circuitlab.faithfulness and .mib
        info.update(metric=metric.name, higher_is_better=metric.higher_is_better)
    if top_k is not None:
        return top_k_circuit(runner.graph, scores, top_k, info)
    return threshold_circuit(runner.graph, scores, threshold, info)
