"""The edge-level computational graph of a GPT-2, and its edge-masked forward.

Nodes follow ACDC (Conmy et al. 2023) and EAP (Syed et al. 2023, Hanna et al. 2024).
Senders write to the residual stream, receivers read it:

    senders (S = 1 + L (H + 1))           receivers (R = L (3H + 1) + 1)
    input       token + position embedding
    a{l}.h{h}   head h of layer l:        a{l}.h{h}<q>, <k>, <v>  its query, key, value input
                z_h @ W_O[h], without b_O                          (before ln1)
    m{l}        MLP l's output            m{l}    MLP l's input (before ln2)
                                          logits  the final residual (before ln_final)

There is an edge u -> r from every sender to every receiver that reads the
residual stream after u wrote to it. An edge mask m [R, S] (entries outside the
edges are ignored) defines the forward

    in_r = c_r + sum_{u -> r} [ m_ru out_u + (1 - m_ru) abl_u ]

where abl_u is the sender's ablated value: its output on the corrupted prompts
in a clean run ("resample", ACDC's default), its mean over a reference batch at
each position ("mean"), or 0 ("zero"). c_r, the attention output biases b_O of
the layers before r, is a constant of the model that no edge carries and no
ablation removes (as in ACDC, whose per-head hook_result excludes b_O). With all
masks 1, in_r is the ordinary residual stream and the forward equals model(tokens).

Dimensions: V variants (masks), B examples, T positions, d = d_model, R and S as
above. A variant's forward is written as its difference from a base trace
(by default the clean run), so that a batch of variants shares everything
upstream of the first receiver where it differs and recomputes only the
nodes that its changes reach: the same prefix sharing as minigpt2.masking,
at the level of single heads and edges.

ACDC's graph (``Graph(L, H, head_inputs=True)``, circuitlab.acdc's default) adds, for every
head input a{l}.h{h}<q|k|v>, the edge ACDC has from hook_{q,k,v}_input[h] to hook_{q,k,v}[h]
(TLACDCCorrespondence.setup_from_model, a DIRECT_COMPUTATION edge): the head's whole query,
key or value input. It is one extra column of the mask, ``graph.gate`` (= S), valid on the
head-input receivers only, so masks are [V, R, S + 1]; its entry g_r scales the whole input:

    in_r = c_r + sum_{u -> r} abl_u + g_r sum_{u -> r} m_ru (out_u - abl_u)

so that g_r = 1 is the input above and g_r = 0 its fully ablated value, the floor. That is
exactly ACDC's: removing the edge makes hook_q[h] take its value in the corrupted run,
``corrupted_cache[hook_q]``, which TransformerLens computes after b_Q from that run's
hook_q_input[h]; the corrupted run's residual stream is the floor above (resample: the
corrupted prompts' stream; zero ablation, where ACDC zeroes hook_resid_pre of block 0,
hook_result and hook_mlp_out, only the b_O constants c_r remain, so the ablated query is
W_Q ln1(c_r) + b_Q, not 0). Under mean ablation (which ACDC lacks) the same rule gives the query of
the all-mean input. A gated mask equals the plain mask m_ru g_r (``Graph.fold``): every
runner evaluates both widths, and ``Circuit.mask()`` is always the plain [R, S] one. A Circuit on
ACDC's graph keeps its sender-to-receiver edges in ``edges`` [R, S], as on the plain graph (so
that faithfulness, MIB export, drawing and comparisons take it as they are), and its kept whole
inputs in ``head_inputs`` [R]; its counts include them, as ACDC's do.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field

import torch

from minigpt2 import distributed
from minigpt2.engine import (BatchMetric, Core, Metric, batch_metric, check_ablation, check_batch, check_model,
                             check_variant_masks, last_positions, progress_bar, weighted_mean)
from minigpt2.hardware import parse_dtype
from minigpt2.heads import Head
from minigpt2.model import GPT2


@dataclass(frozen=True)
class Stage:
    """A step of the forward: the receivers it reads into and the senders it writes."""

    kind: str  # "attn", "mlp" or "logits"
    layer: int
    rows: range  # receiver indices
    n_in: int  # reads senders [0, n_in)
    outs: range  # sender indices it produces


class Graph:
    """Names and indices of the senders, receivers and edges of a GPT-2 with L layers of H heads.

    ``valid`` [R, S] marks the sender-to-receiver edges. head_inputs=True: ACDC's graph, which
    also has the whole input of each head's query, key and value as an edge (see the module
    docstring): its masks have one more column ``gate`` (= n_senders), ``n_columns`` is the masks'
    width (S or S + 1), ``mask_valid`` [R, n_columns] marks both kinds, and ``n_edges`` counts both,
    as ACDC does (TLACDCCorrespondence.count_no_edges counts its ADDITION and DIRECT_COMPUTATION
    edges: GPT-2 small has 32,491 + 432 = 32,923).
    """

    def __init__(self, n_layer: int, n_head: int, head_inputs: bool = False):
        self.n_layer, self.n_head = L, H = n_layer, n_head
        self.head_inputs = bool(head_inputs)
        self.n_senders = 1 + L * (H + 1)
        self.n_receivers = L * (3 * H + 1) + 1
        self.senders = ["input"]
        self.receivers: list[str] = []
        self.stages: list[Stage] = []
        for l in range(L):
            s0, r0 = self.head_sender(l, 0), l * (3 * H + 1)
            self.stages.append(Stage("attn", l, range(r0, r0 + 3 * H), s0, range(s0, s0 + H)))
            self.stages.append(Stage("mlp", l, range(r0 + 3 * H, r0 + 3 * H + 1), s0 + H, range(s0 + H, s0 + H + 1)))
            self.senders += [Head(l, h).mib_name for h in range(H)] + [f"m{l}"]
            self.receivers += [f"{Head(l, h).mib_name}<{kind}>" for kind in "qkv" for h in range(H)] + [f"m{l}"]
        self.stages.append(Stage("logits", L, range(self.n_receivers - 1, self.n_receivers), self.n_senders, range(0)))
        self.receivers.append("logits")
        self.n_in = torch.tensor([st.n_in for st in self.stages for _ in st.rows])  # [R]
        self.stage_of = [i for i, st in enumerate(self.stages) for _ in st.rows]  # receiver -> stage
        # [R]: the head inputs a{l}.h{h}<q|k|v>, which ACDC's graph gates as a whole
        self.is_head_input = torch.tensor([self.stages[i].kind == "attn" for i in self.stage_of])
        plain = torch.arange(self.n_senders)[None, :] < self.n_in[:, None]  # [R, S]
        self.gate = self.n_senders if self.head_inputs else None
        self.n_columns = self.n_senders + self.head_inputs
        self.valid = plain
        self.mask_valid = torch.cat([plain, self.is_head_input[:, None]], 1) if self.head_inputs else plain  # [R, S']
        self.n_edges = int(self.mask_valid.sum())
        self._sender_index = {n: i for i, n in enumerate(self.senders)}
        self._receiver_index = {n: i for i, n in enumerate(self.receivers)}

    @classmethod
    def from_model(cls, model: GPT2, head_inputs: bool = False) -> "Graph":
        return cls(model.cfg.n_layer, model.cfg.n_head, head_inputs)

    def __repr__(self) -> str:
        extra = f", {int(self.is_head_input.sum())} of them whole head inputs" if self.head_inputs else ""
        return f"Graph(n_layer={self.n_layer}, n_head={self.n_head}: {self.n_senders} senders, " \
               f"{self.n_receivers} receivers, {self.n_edges} edges{extra})"

    def fold(self, masks: torch.Tensor) -> torch.Tensor:
        """[..., R, S] or gated [..., R, S + 1] masks -> the plain [..., R, S] masks they run as,
        m_ru * g_r on the head inputs (differentiable). Plain masks come back as they are."""
        S = self.n_senders
        if masks.shape[-1] == S:
            return masks
        if masks.shape[-1] != S + 1:
            raise ValueError(f"edge masks must have S={S} columns (senders), or S + 1 = {S + 1} with ACDC's "
                             f"whole-head-input column; got {masks.shape[-1]}")
        heads = self.is_head_input.to(masks.device)[:, None]  # [R, 1]
        gate = torch.where(heads, masks[..., S:], torch.ones_like(masks[..., S:]))
        return masks[..., :S] * gate

    def edge_name(self, r: int, u: int) -> tuple[str, str]:
        """(sender, receiver) names of entry [r, u]; ACDC's whole-input edge of receiver 'a1.h2<q>' is
        ('a1.h2<q>', 'a1.h2.q'): from the query input (hook_q_input[2]) to the query (hook_q[2])."""
        if u == self.n_senders:
            name = self.receivers[r]
            return name, f"{self.node(name)}.{name[-2]}"
        return self.senders[u], self.receivers[r]

    def head_sender(self, layer: int, head: int) -> int:
        """Head (layer, head)'s sender index (``graph.head_sender(*head)`` for a minigpt2.heads.Head)."""
        return 1 + layer * (self.n_head + 1) + head

    def mlp_sender(self, layer: int) -> int:
        return 1 + layer * (self.n_head + 1) + self.n_head

    def sender_index(self, name: str) -> int:
        if name not in self._sender_index:
            raise KeyError(f"no sender named {name!r}; senders are 'input', 'a{{l}}.h{{h}}' and 'm{{l}}' "
                           f"for l < {self.n_layer}, h < {self.n_head}")
        return self._sender_index[name]

    def receiver_index(self, name: str) -> int:
        if name not in self._receiver_index:
            raise KeyError(f"no receiver named {name!r}; receivers are 'a{{l}}.h{{h}}<q|k|v>', 'm{{l}}' and "
                           f"'logits' for l < {self.n_layer}, h < {self.n_head}")
        return self._receiver_index[name]

    def owner(self, r: int) -> int | None:
        """The sender whose computation receiver r feeds (None for logits)."""
        st = self.stages[self.stage_of[r]]
        if st.kind == "attn":
            return st.outs[(r - st.rows[0]) % self.n_head]
        return st.outs[0] if st.kind == "mlp" else None

    def node(self, name: str) -> str:
        """The component a sender or receiver name belongs to: 'a3.h1<q>' -> 'a3.h1'."""
        return name.split("<")[0]

    def ones(self, dtype=torch.float32) -> torch.Tensor:
        """The full graph's mask: [R, S] ([R, S + 1] on ACDC's graph), 1 on every edge and 0 elsewhere."""
        return self.mask_valid.to(dtype)

    def edge_list(self, mask: torch.Tensor) -> list[tuple[str, str]]:
        """(sender, receiver) names of the sender-to-receiver edges where mask [R, S] (or [R, S + 1])
        is nonzero; ACDC's whole-input edges are listed by :meth:`head_input_list`."""
        S = self.n_senders
        rs = (mask.cpu().bool()[:, :S] & self.valid).nonzero().tolist()
        return [(self.senders[u], self.receivers[r]) for r, u in rs]

    def head_input_list(self, mask: torch.Tensor) -> list[str]:
        """The head inputs (receiver names 'a{l}.h{h}<q|k|v>') whose whole-input edge is kept in a gated
        mask [R, S + 1]; none for a plain graph."""
        if not self.head_inputs or mask.shape[-1] != self.n_columns:
            return []
        kept = mask.cpu().bool()[:, self.gate] & self.is_head_input
        return [self.receivers[r] for r in kept.nonzero()[:, 0].tolist()]


@dataclass
class Circuit:
    """A set of edges of a Graph, with an optional score per edge.

    edges: [R, S] bool, a subset of graph.valid. scores: [R, S] float, the method's per-edge
    values (ACDC: the metric's change when the edge was removed; EAP: the attribution), or None.
    On ACDC's graph (graph.head_inputs) also head_inputs: [R] bool, the head inputs whose whole
    input is kept (default: all), and head_input_scores: [R] float or None. Edges into a head
    input whose whole input is removed carry nothing and are dropped.
    """

    graph: Graph
    edges: torch.Tensor
    scores: torch.Tensor | None = None
    info: dict = field(default_factory=dict)
    head_inputs: torch.Tensor | None = None
    head_input_scores: torch.Tensor | None = None

    def __post_init__(self):
        g = self.graph
        edges = self.edges.detach().cpu().bool()
        if g.head_inputs and edges.shape[-1] == g.n_columns:  # a gated mask [R, S + 1]
            if self.head_inputs is None:
                self.head_inputs = edges[:, g.gate]
            edges = edges[:, :g.n_senders]
        if self.scores is not None and g.head_inputs and self.scores.shape[-1] == g.n_columns:
            if self.head_input_scores is None:
                self.head_input_scores = self.scores[:, g.gate]
            self.scores = self.scores[:, :g.n_senders]
        self.edges = edges & g.valid
        if g.head_inputs:
            kept = g.is_head_input if self.head_inputs is None else self.head_inputs.detach().cpu().bool()
            self.head_inputs = kept & g.is_head_input
            self.edges &= self.head_inputs[:, None] | ~g.is_head_input[:, None]
        elif self.head_inputs is not None:
            raise ValueError("head_inputs belong to ACDC's graph: build the circuit on Graph(L, H, head_inputs=True)")

    @property
    def n_edges(self) -> int:
        """Kept edges; on ACDC's graph the kept whole head inputs count too, as in ACDC."""
        return int(self.edges.sum()) + (int(self.head_inputs.sum()) if self.head_inputs is not None else 0)

    def mask(self, dtype=torch.float32) -> torch.Tensor:
        """The edge mask [R, S] that runs this circuit on any EdgeRunner (1 = kept, 0 = ablated)."""
        return self.edges.to(dtype)

    def gated_mask(self, dtype=torch.float32) -> torch.Tensor:
        """The mask in the graph's own width: [R, S + 1] on ACDC's graph (the whole-input column last),
        else [R, S]."""
        if self.head_inputs is None:
            return self.mask(dtype)
        return torch.cat([self.edges, self.head_inputs[:, None]], 1).to(dtype)

    def edge_list(self) -> list[tuple[str, str]]:
        """(sender, receiver) names of the kept sender-to-receiver edges."""
        return self.graph.edge_list(self.edges)

    def head_input_names(self) -> list[str]:
        """ACDC's graph: the head inputs 'a{l}.h{h}<q|k|v>' whose whole input is kept ([] otherwise)."""
        if self.head_inputs is None:
            return []
        return [self.graph.receivers[r] for r in self.head_inputs.nonzero()[:, 0].tolist()]

    def nodes(self) -> list[str]:
        """Components with a kept edge: 'input', 'a{l}.h{h}', 'm{l}', 'logits', in graph order."""
        g, used = self.graph, set()
        for r, u in self.edges.nonzero().tolist():
            used.add(g.senders[u])
            used.add(g.node(g.receivers[r]))
        used.update(g.node(r) for r in self.head_input_names())
        order = {n: i for i, n in enumerate(g.senders + ["logits"])}
        return sorted(used, key=order.__getitem__)

    def node_counts(self) -> dict[str, int]:
        """Sizes of the circuit.

        edges (on ACDC's graph with the kept whole head inputs, as ACDC's count_no_edges); heads and
        mlps (components with a kept edge); nodes: senders plus receivers with a kept edge;
        acdc_nodes: ACDC's hook-level count, which adds one hook_q/k/v node per kept head input
        (the present endpoints of its edges, acdc_utils.get_present_nodes; the 'Nodes in Circuit'
        column of the paper's table counts these); on the plain graph a head input with a kept
        edge stands for a kept whole input. ACDC's graph adds head_inputs: the kept whole inputs.
        """
        g = self.graph
        senders = self.edges.any(dim=0)  # [S]
        receivers = self.edges.any(dim=1)  # [R]
        nodes = self.nodes()
        if self.head_inputs is not None:
            receivers = receivers | self.head_inputs
            qkv = int(self.head_inputs.sum())
        else:
            qkv = int((receivers & g.is_head_input).sum())
        counts = {
            "edges": self.n_edges,
            "heads": sum(1 for n in nodes if n.startswith("a")),
            "mlps": sum(1 for n in nodes if n.startswith("m")),
            "nodes": int(senders.sum() + receivers.sum()),
            "acdc_nodes": int(senders.sum() + receivers.sum()) + qkv,
        }
        if self.head_inputs is not None:
            counts["head_inputs"] = qkv
        return counts

    def head_mask(self) -> torch.Tensor:
        """[L, H] bool: heads that write along a kept edge."""
        g = self.graph
        idx = torch.tensor([[g.head_sender(l, h) for h in range(g.n_head)] for l in range(g.n_layer)])
        return self.edges.any(dim=0)[idx]

    def heads(self) -> list[Head]:
        """The heads that write along a kept edge, layer-major (``str(head)``: "L3H1"; ``head.mib_name``: "a3.h1")."""
        return [Head(l, h) for l, h in self.head_mask().nonzero().tolist()]

    def pruned(self, resample: bool = False) -> "Circuit":
        """The circuit without edges that cannot reach the logits (exact under every ablation:
        such an edge changes nothing downstream).

        resample=True also drops the edges out of components none of whose inputs is kept:
        under resample ablation such a component computes its corrupted output, so its
        edges carry the ablated value anyway (ACDC can leave these behind when it removes a
        component's inputs after keeping its outputs). Not exact under mean or zero ablation.

        On ACDC's graph a kept whole head input without a kept edge into it goes too: its value
        is the ablated one either way (exact under every ablation).
        """
        g, edges = self.graph, self.edges.clone()
        if resample:
            inputs: dict[int, list[int]] = {}  # component -> its receivers
            for r in range(g.n_receivers - 1):
                inputs.setdefault(g.owner(r), []).append(r)
            for u, rows in inputs.items():  # topological order: a dropped source can starve the next
                if not edges[rows].any():
                    edges[:, u] = False
        for r in reversed(range(g.n_receivers)):  # reverse topological order
            u = g.owner(r)
            if u is not None and not edges[:, u].any():
                edges[r] = False
        whole = None if self.head_inputs is None else self.head_inputs & edges.any(dim=1)
        return Circuit(g, edges, self.scores, dict(self.info), whole, self.head_input_scores)

    def to_json(self) -> dict:
        """edges as "sender->receiver"; on ACDC's graph ("graph": "acdc") the kept whole head inputs
        too, in ACDC's terms "a1.h2<q>->a1.h2.q" (hook_q_input[2] -> hook_q[2]), so that len(edges) is
        ACDC's count."""
        g = self.graph
        names = [f"{u}->{r}" for u, r in self.edge_list()]
        scores = None if self.scores is None else {f"{u}->{r}": float(self.scores[g.receiver_index(r),
                                                                                g.sender_index(u)])
                                                   for u, r in self.edge_list()}
        if self.head_inputs is not None:
            for r in self.head_inputs.nonzero()[:, 0].tolist():
                name = "->".join(g.edge_name(r, g.gate))
                names.append(name)
                if scores is not None:
                    scores[name] = 0.0 if self.head_input_scores is None else float(self.head_input_scores[r])
        out = {"n_layer": g.n_layer, "n_head": g.n_head}
        if g.head_inputs:
            out["graph"] = "acdc"
        return out | {"edges": names, "scores": scores, "node_counts": self.node_counts(), "nodes": self.nodes(),
                      "info": json.loads(json.dumps(self.info, default=float))}

    @classmethod
    def from_json(cls, d: dict) -> "Circuit":
        acdc = d.get("graph") == "acdc"
        g = Graph(d["n_layer"], d["n_head"], head_inputs=acdc)
        edges = torch.zeros(g.n_receivers, g.n_senders, dtype=torch.bool)
        whole = torch.zeros(g.n_receivers, dtype=torch.bool) if acdc else None
        for e in d["edges"]:
            u, r = e.split("->")
            if acdc and r.endswith((".q", ".k", ".v")):  # a whole head input: "a1.h2<q>->a1.h2.q"
                whole[g.receiver_index(u)] = True
            else:
                edges[g.receiver_index(r), g.sender_index(u)] = True
        return cls(g, edges, info=d.get("info", {}), head_inputs=whole)


@dataclass
class Trace:
    """One variant's forward: its mask, each sender's effect out_u - abl_u, and its logits."""

    mask: torch.Tensor  # [R, S]
    effect: torch.Tensor  # [S, B, T, d]
    effect_at: torch.Tensor  # [S, B, d], at the answer positions
    logits: torch.Tensor  # [B, vocab]
    inputs: list[torch.Tensor] | None = None  # per stage [R_stage, B, T, d] ([1, B, d] for logits), if kept


@torch.no_grad()
def sender_outputs(model: GPT2, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Every sender's output in a clean run, through the model's own hooks: [S, B, T, d]."""
    L = model.cfg.n_layer
    names = ["hook_embed", "hook_pos_embed"] + [f"blocks.{l}.attn.hook_z" for l in range(L)] \
        + [f"blocks.{l}.hook_mlp_out" for l in range(L)]
    _, cache = model.run_with_cache(tokens, names=names, attention_mask=attention_mask)
    outs = [cache["hook_embed"] + cache["hook_pos_embed"]]
    for l in range(L):
        z = cache[f"blocks.{l}.attn.hook_z"]  # [B, T, H, d_head]
        heads = torch.einsum("bthe,hed->hbtd", z, model.blocks[l].attn.W_O)  # [H, B, T, d]
        outs += list(heads) + [cache[f"blocks.{l}.hook_mlp_out"]]
    return torch.stack(outs)


def run_with_edge_masks(model: GPT2, tokens: torch.Tensor, masks: torch.Tensor, ablation: str = "resample",
                        metric: Metric | BatchMetric | None = None, group=None, **data) -> torch.Tensor:
    """Evaluate edge masks [V, R, S] (or ACDC's [V, R, S + 1]) in one batched call:
    ``EdgeRunner(model, tokens, ablation, group=group, **data).run(masks, metric=metric)`` (``data``: corrupted,
    reference, attention_mask, reference_mask, positions, max_rows, dtype). The edge-level twin of minigpt2's
    run_with_head_masks; ``group`` as there (the variants split over its ranks, the one-process values)."""
    return EdgeRunner(model, tokens, ablation, group=group, **data).run(masks, metric=metric)


def check_runner(runner, what: str) -> None:
    if not isinstance(runner, EdgeRunner):
        raise TypeError(f"{what} takes an EdgeRunner(model, tokens, ablation, ...), the batch and the ablation to "
                        f"decide edges on, got {type(runner).__name__}")


class EdgeRunner:
    """Edge-masked forwards of one batch under one ablation.

    Args:
        tokens: [B, T] clean prompts; ``attention_mask`` [B, T] if right-padded.
        ablation: "resample" (needs ``corrupted``: [B, T] prompts paired one-to-one with
            the clean ones, at equal length; they share the clean attention mask), "mean"
            (the per-position mean over ``reference`` tokens, default the clean ones,
            weighted by ``reference_mask``) or "zero".
        positions: [B] the position whose logits are scored (default: each row's last real token).
        max_rows: examples x variants per batched chunk (default: what the device's memory budget
            allows, minigpt2.engine.memory_budget, MINIGPT2_MEMORY_BUDGET included); ``runner.max_rows``
            may be changed afterwards.
        dtype: None (the model's precision) or torch.bfloat16: bf16 matmuls, fp32 residual stream
            (minigpt2.engine); the ablated values and ``exact_values`` stay fp32.
        group: the torch.distributed group whose ranks split the work of :meth:`run` (its chunks of
            variants) and of the methods on this runner (EAP's example chunks, edge patching's jobs), with
            the one-process results, bit for bit, on every rank; None: the default group where this
            process opted in (minigpt2.distributed.init_from_env), else this process alone;
            minigpt2.distributed.LOCAL: alone. Every rank of the group must make the same calls
            (``runner.run`` is a collective; ``trace``, ``retrace`` and ``select`` are local).

    ``runner.run(masks)`` evaluates many masks at once; ``runner.trace(mask)`` runs one. Both run on
    ``runner.core`` (minigpt2.engine.Core: the model's heads, MLPs, blocks and unembedding, the chunking
    and the precision rules), as exact edge patching does.
    """

    def __init__(self, model: GPT2, tokens: torch.Tensor, ablation: str = "resample",
                 corrupted: torch.Tensor | None = None, reference: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, reference_mask: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None, max_rows: int | None = None, dtype=None, group=None):
        check_model(model, "EdgeRunner")
        self.model, self.graph = model, Graph.from_model(model)
        self.ablation = check_ablation(ablation)
        self.dtype = parse_dtype(dtype, model.device)
        dev = model.device
        self.tokens = check_batch(model, tokens)
        B, T = self.tokens.shape
        self.attention_mask = model.check_attention_mask(attention_mask, self.tokens)
        self.positions = (last_positions(self.tokens, self.attention_mask) if positions is None
                          else model.check_positions(torch.as_tensor(positions).to(dev), B, T))
        self.attn = model.attention_mask(self.attention_mask, T, T)  # [B, 1, T, T] or None
        self.core = Core(model, self.attn, self.positions, self.dtype, group=distributed.resolve_group(group))
        self.ablated = self._ablated(corrupted, reference, reference_mask)  # [S, B | 1, T | 1, d]
        # floor: a stage's receiver input with all its edges ablated: c_r + sum_{u < n_in} abl_u
        b_O = torch.stack([blk.attn.c_proj.bias for blk in model.blocks]).detach()  # [L, d]
        cum = torch.cat([torch.zeros_like(self.ablated[:1]), self.ablated.cumsum(0)])  # [S + 1, ...]
        self.floor = [cum[st.n_in] + b_O[:st.layer + (st.kind != "attn")].sum(0) for st in self.graph.stages]
        self.floor_at = [self.at(f) for f in self.floor]
        self.max_rows = self.core.rows(self.bytes_per_row(), at_least=B, max_rows=max_rows)
        with torch.no_grad():
            self.clean = self.trace(self.graph.ones(model.dtype))

    @property
    def low_precision(self) -> bool:
        return self.dtype is not None and self.dtype != self.model.dtype

    def bytes_per_row(self) -> int:
        """One row's (variant x example) transient activations in a chunk of :meth:`run`: its changed sender
        effects and receiver inputs, T vectors of d_model each."""
        T, cfg = self.tokens.shape[1], self.model.cfg
        return T * cfg.d_model * 4 * (self.graph.n_senders + 3 * cfg.n_head + 8)

    def grad_rows(self, budget: int | None = None) -> int:
        """Examples per chunk of a differentiated trace (EAP's gradients) within the memory budget
        (minigpt2.engine.memory_budget). A row keeps, for the backward pass, about 4 vectors of
        d_model per receiver input (the input, its layer norm, the head's share) and 3 per sender at
        each position, and its logits (measured: 46 MB a row at T = 34 on the bundled 12 x 12
        models; this gives 43 MB)."""
        g, cfg = self.graph, self.model.cfg
        T = self.tokens.shape[1]
        per_row = T * cfg.d_model * 4 * (4 * g.n_receivers + 3 * g.n_senders) + 4 * cfg.vocab_size * 4
        core = self.local_core() if budget is None else Core(self.model, budget=budget)
        return core.rows(per_row)

    @property
    def group(self):
        """The process group this runner's work is split over (None: this process alone)."""
        return self.core.group

    @property
    def writer(self) -> bool:
        """Whether this process shows progress and writes: rank 0 of the runner's group, or a process alone."""
        return self.core.writer

    def local_core(self) -> Core:
        """The runner's core for this process alone (the same batch, precision and budget, no group)."""
        return Core(self.model, self.attn, self.positions, self.dtype, self.core.budget)

    def select(self, rows: slice) -> "EdgeRunner":
        """This runner on the examples ``rows`` (a slice) only: the same ablated values, floors and
        answer positions, row by row; what a differentiated trace takes chunk by chunk. A trace of
        it equals the rows of this runner's trace (each example's forward reads only its own row).
        It runs in this process alone (no group): one rank's own share of a distributed method."""
        B = self.tokens.shape[0]
        start, stop, _ = rows.indices(B)

        def cut(x: torch.Tensor, dim: int) -> torch.Tensor:  # a batch dimension, or 1 (shared by every row)
            return x if x.shape[dim] == 1 and B != 1 else x.narrow(dim, start, stop - start)

        sub = copy.copy(self)
        sub.tokens, sub.positions = self.tokens[start:stop], self.positions[start:stop]
        sub.attention_mask = None if self.attention_mask is None else self.attention_mask[start:stop]
        sub.attn = None if self.attn is None else cut(self.attn, 0)
        sub.core = Core(self.model, sub.attn, sub.positions, self.dtype, self.core.budget)
        sub.ablated = cut(self.ablated, 1)  # [S, B | 1, T | 1, d]
        sub.floor = [cut(f, -3) for f in self.floor]  # [B | 1, T | 1, d]
        sub.floor_at = [f[start:stop] for f in self.floor_at]  # [B, d]
        c = self.clean
        sub.clean = Trace(c.mask, c.effect[:, start:stop], c.effect_at[:, start:stop], c.logits[start:stop])
        return sub

    @torch.no_grad()
    def exact_values(self, masks: list[torch.Tensor], metric) -> list[float]:
        """metric of each mask [R, S] from a full forward in the model's own precision (fp32): what a bf16
        search re-evaluates near its threshold."""
        metric = batch_metric(metric)
        return [float(metric(self.trace(m, exact=True).logits[None])[0]) for m in masks]

    def _ablated(self, corrupted, reference, reference_mask) -> torch.Tensor:
        model, S = self.model, self.graph.n_senders
        if self.ablation == "zero":
            return torch.zeros(S, 1, 1, model.cfg.d_model, device=model.device, dtype=model.dtype)
        if self.ablation == "resample":
            if corrupted is None:
                raise ValueError("ablation='resample' needs corrupted=[B, T] prompts paired with the clean ones; "
                                 "or use ablation='mean' or 'zero'")
            corrupted = torch.as_tensor(corrupted).to(model.device)
            if corrupted.shape != self.tokens.shape:
                raise ValueError(f"corrupted prompts have shape {tuple(corrupted.shape)} but the clean ones "
                                 f"{tuple(self.tokens.shape)}: resample ablation pairs them row by row at equal "
                                 "token length. Fix: pair each clean prompt with a corrupted one of the same "
                                 "length (filter or regroup by length)")
            return sender_outputs(model, corrupted, self.attention_mask)
        ref = self.tokens if reference is None else torch.as_tensor(reference).to(model.device)
        ref_mask = (self.attention_mask if reference is None else reference_mask)
        if ref.shape[1] != self.tokens.shape[1]:
            raise ValueError(f"mean ablation takes a per-position mean, so reference sequences must have the "
                             f"clean length {self.tokens.shape[1]}, got {ref.shape[1]}. Fix: pad or trim them")
        return weighted_mean(sender_outputs(model, ref, ref_mask), ref_mask)[:, None]  # [S, 1, T, d]

    def at(self, x: torch.Tensor) -> torch.Tensor:
        """[..., B | 1, T | 1, d] -> [..., B, d] at the answer positions."""
        B = self.tokens.shape[0]
        x = x.expand(*x.shape[:-3], B, *x.shape[-2:])
        if x.shape[-2] == 1:
            return x[..., 0, :]
        return x[..., torch.arange(B, device=x.device), self.positions, :]

    def check_masks(self, masks) -> torch.Tensor:
        g = self.graph
        masks = check_variant_masks(masks, {"R": (g.n_receivers,), "S": (g.n_senders, g.n_senders + 1)},
                                    note=" (receivers x senders, see Graph; or S + 1 columns with ACDC's whole "
                                        "head inputs)")
        masks = masks.to(device=self.model.device, dtype=self.model.dtype)
        return g.fold(masks) * g.valid.to(self.model.device)  # ACDC's whole-head-input column folded in

    # --- one variant, every node computed ---------------------------------------------------------
    def trace(self, mask: torch.Tensor, embed: torch.Tensor | None = None, keep_inputs: bool = False,
              exact: bool = False) -> Trace:
        """The forward of one mask [R, S], computing every node (differentiable in mask and embed).

        embed: [B, T, d] replaces the input node's output (EAP-IG interpolates it).
        keep_inputs: keep each stage's receiver inputs (requiring grad) in ``Trace.inputs``.
        exact: in the model's own precision even when the runner's dtype is bf16.
        """
        with self.core.precision(exact=exact):
            return self._trace(mask, embed, keep_inputs)

    def _trace(self, mask: torch.Tensor, embed: torch.Tensor | None, keep_inputs: bool) -> Trace:
        core, g = self.core, self.graph
        mask = self.check_masks(mask[None])[0]
        B, T = self.tokens.shape
        x0 = core.embed(self.tokens, self.attention_mask) if embed is None else embed
        # out_u - abl_u per sender: stacked anew at each stage for autograd, else written in place
        effects = [x0 - self.ablated[0]]  # [B, T, d] each
        buffer = None if torch.is_grad_enabled() else x0.new_empty(g.n_senders, *x0.shape)
        inputs, logits, filled = [], None, 0
        for i, st in enumerate(g.stages):
            if buffer is None:
                D = torch.stack(effects)  # [n_in, B, T, d]
            else:
                buffer[filled:st.n_in] = torch.stack(effects[filled:st.n_in])
                D, filled = buffer[:st.n_in], st.n_in
            m = mask[st.rows.start:st.rows.stop, :st.n_in]  # [R_st, n_in]
            if st.kind == "logits":
                x = self.floor_at[i] + torch.einsum("ru,ubd->rbd", m, self.at(D))  # [1, B, d]
            else:
                x = self.floor[i] + torch.einsum("ru,ubtd->rbtd", m, D)  # [R_st, B, T, d]
            if keep_inputs:
                if not x.requires_grad:
                    x.requires_grad_()
                inputs.append(x)
            if st.kind == "attn":
                H = g.n_head
                xq, xk, xv = x.view(3, H, B, T, -1).permute(0, 2, 3, 1, 4)  # each [B, T, H, d]
                out = core.heads(st.layer, xq, xk, xv, list(range(H)), self.attn)  # [B, T, H, d]
                effects += list(out.permute(2, 0, 1, 3) - self.ablated[st.outs.start:st.outs.stop])
            elif st.kind == "mlp":
                effects.append(core.mlp(st.layer, x[0]) - self.ablated[st.outs.start])
            else:
                logits = core.logits(x[0])  # [B, vocab], in the model's dtype
        D = torch.stack(effects) if buffer is None else buffer
        return Trace(mask, D, self.at(D), logits, inputs if keep_inputs else None)

    # --- many variants, as differences from a base trace --------------------------------------------
    def run(self, masks: torch.Tensor, base: Trace | None = None, metric: Metric | BatchMetric | None = None,
            progress: bool = False, desc: str = "edge variants") -> torch.Tensor:
        """Evaluate V edge masks [V, R, S] in batched passes (ACDC's graph's [V, R, S + 1] are folded
        to [V, R, S] first, Graph.fold).

        Each variant is computed as its difference from ``base`` (default: the clean
        run): it joins the batch at the first stage where its mask differs, and only the
        heads, MLPs and logits that its changes reach are recomputed. Masks that require
        grad are computed in full (every node), so that gradients reach every entry.

        Returns logits [V, B, vocab] at the answer positions, or ``metric(logits)`` [V, ...]
        applied chunk by chunk. Equals ``trace(mask)`` for each mask, to float tolerance.
        ``progress``: a bar (or log lines) over the chunks, named ``desc`` (on the writer rank only).

        With a group (see the class), the chunks are split over its ranks and every rank returns all
        V values, those of one process bit for bit; it is a collective: every rank calls it with the
        same masks. Masks that require grad (learned masks' training) are computed whole on every
        rank, so that their gradients stay in this process's autograd graph.
        """
        g = self.graph
        masks = self.check_masks(masks)
        metric = None if metric is None else batch_metric(metric)
        base = self.clean if base is None else base
        dmask = masks - base.mask
        grad = masks.requires_grad
        n_st = len(g.stages)
        if grad:
            join = [0] * masks.shape[0]
        else:
            differs = torch.stack([dmask[:, st.rows.start:st.rows.stop].ne(0).flatten(1).any(1) for st in g.stages], 1)
            join = torch.where(differs.any(1), differs.float().argmax(1), torch.full_like(differs[:, 0], n_st,
                                                                                          dtype=torch.long)).tolist()
        core = self.local_core() if grad else self.core  # gradients are not gathered: whole on each rank
        outputs: dict[int, torch.Tensor] = {}
        with torch.set_grad_enabled(grad), core.precision():
            chunks = core.chunks(join, self.bytes_per_row(), self.tokens.shape[0], self.max_rows)
            with core.step(desc):
                for chunk in progress_bar(chunks, desc, "chunk", progress and core.writer):
                    logits, _ = self._propagate(masks[chunk], dmask[chunk], [join[v] for v in chunk], base, grad)
                    values = metric(logits) if metric is not None else logits
                    outputs.update(zip(chunk, values))
        outputs = core.gather(outputs, masks.shape[0])  # distributed: every rank's share, exactly
        return torch.stack([outputs[v] for v in range(masks.shape[0])])

    @torch.no_grad()
    def retrace(self, base: Trace, mask: torch.Tensor, reuse: bool = False) -> Trace:
        """trace(mask), computed as a difference from ``base`` (only the reached nodes are recomputed).
        ``reuse``: update base's effects in place instead of copying them ([S, B, T, d], the
        largest tensor of a run), for a caller that discards ``base`` (ACDC's current circuit)."""
        mask = self.check_masks(mask[None])
        dmask = mask - base.mask
        differs = [bool(dmask[0, st.rows.start:st.rows.stop].ne(0).any()) for st in self.graph.stages]
        join = differs.index(True) if any(differs) else len(differs)
        effect = base.effect if reuse else base.effect.clone()
        with self.core.precision():
            logits, _ = self._propagate(mask, dmask, [join], base, False, effect)
        return Trace(mask[0], effect, self.at(effect), logits[0])

    def _propagate(self, m, dm, join, base: Trace, grad: bool, effect: torch.Tensor | None = None):
        """Variants m [n, R, S] (dm = m - base.mask) that equal ``base`` before stage join[i].

        Returns logits [n, B, vocab] and s0, the first sender that may differ from base's.
        ``effect`` (one variant, without grad): base's sender effects [S, B, T, d], which are
        updated in place to the variant's.
        """
        g = self.graph
        B, T = self.tokens.shape
        S = g.n_senders
        n = m.shape[0]
        rank = sorted(range(n), key=join.__getitem__)  # rows enter the batch in join order
        m, dm, join = m[rank], dm[rank], [join[i] for i in rank]
        first = min(join)
        s0 = g.stages[first].outs.start if first < len(g.stages) - 1 else S
        # delta[v, u - s0]: how sender u's output differs from base's in variant v. Without grad,
        # written in place into uninitialised memory: each stage fills all n rows of its senders'
        # columns (computed, or zero where not recomputed) before a later stage reads them; with
        # grad, grown by concatenation, so autograd sees no overwrite.
        shape = (n, S - s0) if not grad else (n, 0)
        delta = (base.effect.new_zeros if grad else base.effect.new_empty)(*shape, *base.effect.shape[1:])
        changed = torch.zeros(S, dtype=torch.bool, device=m.device)  # may differ in some variant
        logits = base.logits.expand(n, *base.logits.shape)
        active = 0
        for i in range(first, len(g.stages)):
            st = g.stages[i]
            active += sum(1 for j in join if j == i)
            rows = slice(st.rows.start, st.rows.stop)
            ma, dma = m[:active, rows, :st.n_in], dm[:active, rows, :st.n_in]  # [n, R_st, n_in]
            touch = dma.ne(0).any(0).any(-1) | (ma.ne(0) & changed[:st.n_in]).any(0).any(-1)  # [R_st]
            if grad:
                touch[:] = True
            heads, us, out = [], [], None  # the heads recomputed (attention), the senders recomputed, their outputs
            if touch.any():
                heads, sel, us = self._recomputed(st, touch)
                logits, out = self._stage(i, ma[:, sel], dma[:, sel], heads, sel, base, delta[:active], s0, changed,
                                          logits, grad)
            if st.kind == "logits":
                continue
            if grad:
                new = out - self.ablated[list(st.outs)] - base.effect[list(st.outs)]  # [active, k, B, T, d]
                delta = torch.cat([delta, torch.cat([new, new.new_zeros(n - active, *new.shape[1:])])], 1)
                changed[list(st.outs)] = True
                continue
            self._store(delta, st, us, out, active, s0, base, changed)
        if effect is not None:
            effect[s0:] += delta[0]
        if rank != list(range(n)):
            logits = logits[torch.tensor(rank).argsort().to(logits.device)]
        return logits, s0

    def _recomputed(self, st, touch):
        """(heads, sel, us) of a stage whose receiver rows ``touch`` [R_st] are reached: the heads
        recomputed (attention; [] otherwise), the stage's receiver rows that feed them, and the
        senders they output."""
        if st.kind != "attn":
            return [], [0], list(st.outs)
        H = self.graph.n_head
        heads = touch.view(3, H).any(0).nonzero()[:, 0].tolist()  # rows are (q, k, v) x heads
        return heads, [kind * H + h for kind in range(3) for h in heads], [st.outs[h] for h in heads]

    def _store(self, delta, st, us, out, active, s0, base: Trace, changed) -> None:
        """Without grad: write stage ``st``'s columns of ``delta`` [n, S - s0, B, T, d] in place, the
        recomputed senders ``us`` from ``out`` [active, k, B, T, d] for the first ``active`` rows,
        zero (equal to base) everywhere else; mark ``us`` in ``changed``."""
        if us:
            cols = [u - s0 for u in us]
            delta[:active, cols] = out - self.ablated[us] - base.effect[us]  # [active, k, B, T, d]
            if active < delta.shape[0]:  # rows that join later equal base here
                delta[active:, cols] = 0
            changed[us] = True
        rest = [u - s0 for u in st.outs if u not in us]
        if rest:
            delta[:, rest] = 0

    def _stage(self, i, ma, dma, heads, sel, base: Trace, delta, s0, changed, logits, grad):
        """Recompute stage i's ``heads`` (attention) or node for the active variants, from the
        stage's receiver rows ``sel`` (ma, dma: their masks [n, R', n_in]).

        Returns (logits, outputs [n, k, B, T, d] of the recomputed senders)."""
        core, st = self.core, self.graph.stages[i]
        n, R = ma.shape[:2]
        B, T = self.tokens.shape
        at = st.kind == "logits"
        D = base.effect_at if at else base.effect  # [S, B, (T,) d]
        # the variant's mask applied to base's sender effects, plus the change of its senders
        floor = self.floor_at[i] if at else self.floor[i]
        nz = dma.ne(0)
        if grad or int(nz.sum()) > 4 * n * R:  # many edits: each variant's own mask, one product
            x = floor + _mix(ma, D[None, :st.n_in], dense=grad)  # [n, R', B, (T,) d]
        else:  # a few edits: base's input, shared, plus each edit's term
            base_rows = base.mask[st.rows.start:st.rows.stop, :st.n_in][sel]  # [R', n_in]
            x = floor + _mix(base_rows[None], D[None, :st.n_in])[0]  # [R', B, (T,) d]
            v, r, u = nz.nonzero(as_tuple=True)
            contrib = dma[v, r, u].view(-1, *[1] * (D.ndim - 1)) * D[u]  # [nnz, B, (T,) d]
            x = x + D.new_zeros(n * R, *D.shape[1:]).index_add(0, v * R + r, contrib).view(n, R, *D.shape[1:])
        if changed[:st.n_in].any():
            lo = int(changed.nonzero()[0])
            mc = ma[:, :, lo:st.n_in]  # [n, R', C]
            if grad or mc.ne(0).any():
                dl = delta[:, lo - s0:st.n_in - s0]  # [n, C, B, T, d]
                x = x + _mix(mc, self.at(dl) if at else dl, dense=grad)
        x = x.expand(n, *x.shape[1:]) if x.shape[0] != n else x
        if at:
            return torch.cat([core.logits(x[:, 0]), logits[n:]]), None  # variants that never joined keep base's
        if st.kind == "attn":
            Hs = len(heads)
            xq, xk, xv = x.reshape(n, 3, Hs, B, T, -1).permute(1, 0, 3, 4, 2, 5).reshape(3, n * B, T, Hs, -1)
            out = core.heads(st.layer, xq, xk, xv, heads, core.mask(n)).view(n, B, T, Hs, -1)
            return logits, out.permute(0, 3, 1, 2, 4)  # [n, Hs, B, T, d]
        return logits, core.mlp(st.layer, x[:, 0].reshape(n * B, T, -1)).view(n, 1, B, T, -1)


def _mix(m: torch.Tensor, D: torch.Tensor, dense: bool = False) -> torch.Tensor:
    """sum_u m[n, r, u] D[n | 1, u, ...] -> [n, r, ...], over the columns of m that are not all zero
    (a pruned circuit reads few senders)."""
    cols = m.ne(0).any(0).any(0)
    if not dense and int(cols.sum()) < 0.75 * m.shape[-1]:
        m, D = m[:, :, cols], D[:, cols]
    n, r, u = m.shape
    if D.shape[0] == 1:  # senders shared by the variants: one 2-D product (a batched one would copy D n times)
        out = torch.matmul(m.reshape(n * r, u), D[0].reshape(u, math.prod(D.shape[2:])))  # [n r, prod(...)]
    else:
        out = torch.matmul(m, D.flatten(2))  # [n, r, prod(...)]
    return out.view(n, r, *D.shape[2:])
