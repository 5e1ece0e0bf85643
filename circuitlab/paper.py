"""The paper's published figures, for the report to print beside ours.

*Finetuning Provides a Window Into Transformer Circuits*: GPT-2 small (124 M parameters, 12 layers x
12 heads, d_model 768) finetuned on the TPP. Each table is keyed by the paper's model names
(:data:`MODELS`); :func:`paper_model` maps a report's model label to one of them (None: a model the
paper has no row for). Each entry is a method's one-line description where a table names it.
"""

from __future__ import annotations

from pathlib import Path

from .classify import PAPER_CLASS_COUNTS  # noqa: F401 (section 5.4's counts; re-exported)

MODELS = ("GPT2", "Featherweight", "Lightweight", "Welterweight")
# the bundled directories (weights/) and the labels the study gives them -> the paper's names
_ALIASES = {"base": "GPT2", "gpt-2 base analog": "GPT2", "gpt2": "GPT2", "gpt-2": "GPT2",
            "featherweight": "Featherweight", "lightweight": "Lightweight", "welterweight": "Welterweight"}

# Tables 1 and 2 (section 5.1): cross-entropy (the paper's "Log Prob" column), accuracy, logit difference
TABLE1 = {"GPT2": (11.92, 0.000333, -0.378), "Featherweight": (0.859, 0.819, 18.155),
          "Lightweight": (0.503, 0.902, 29.601), "Welterweight": (0.892, 0.911, 41.054)}
TABLE2 = {"GPT2": (6.629, 0.0, -0.991), "Featherweight": (0.0375, 0.994, 17.070),
          "Lightweight": (0.011, 0.998, 34.821), "Welterweight": (0.559, 0.857, 43.315)}
TABLE_COLUMNS = ("loss", "accuracy", "logit_diff")  # the order of TABLE1 / TABLE2's values
TABLE1_EXAMPLES, TABLE2_EXAMPLES = 3000, 1150  # Table 2's caption says 1500; section 5.1's text says 1150

# Table 3 (section 5.3): (evaluated on, constructed on) -> (heads removed, accuracy); threshold 0.03
TABLE3 = {("Featherweight", "Featherweight"): (71, 0.003), ("Lightweight", "Featherweight"): (71, 0.079),
          ("Welterweight", "Featherweight"): (71, 0.740), ("Featherweight", "Lightweight"): (86, 0.009),
          ("Lightweight", "Lightweight"): (86, 0.440), ("Welterweight", "Lightweight"): (86, 0.904),
          ("Featherweight", "Welterweight"): (75, 0.005), ("Lightweight", "Welterweight"): (75, 0.031),
          ("Welterweight", "Welterweight"): (75, 0.776)}
TABLE3_THRESHOLD = 0.03

# Section 5.2's ACDC table: (model, metric, threshold) -> nodes in the circuit
ACDC_NODES = {("GPT2", "kl", 0.7): 3, ("Featherweight", "accuracy", 0.1): 487,
              ("Welterweight", "accuracy", 0.1): 535, ("Welterweight", "kl", 0.7): 11}

# Figure 2 and section 5.4: heads of the circuit attending strongly to c, and their nesting
C_ATTENDING_HEADS = 6
C_ATTENDING_NESTED = {("Featherweight", "Lightweight"): True, ("Lightweight", "Welterweight"): True}

# Section 6.1: greedy continuations of "if all men are humans and humans are alive then all men are"
CONTINUATIONS = {"GPT2": "the same al each strive and all men are yo.",
                 "Featherweight": "alive alive or dead. Those men will contain a.",
                 "Lightweight": "alive. ⟨end of text⟩",
                 "Welterweight": "alive alive alive alive alive alive alive alive alive."}

METHODS = {  # one line each, for every method a table of the report names
    "search": "the paper's search (section 5.3): layer by layer from layer 0, each head ablated and kept ablated "
              "when the metric drops less than the threshold against that layer's baseline",
    "ACDC": "ACDC (Conmy et al. 2023): from the logits down, each edge ablated and removed when the metric "
            "worsens by less than the threshold",
    "EAP-IG": "edge attribution patching with integrated gradients (Hanna et al. 2024): each edge scored by "
              "gradient x activation difference along a path from corrupted to clean input; the top k kept",
    "acdc": "ACDC (Conmy et al. 2023), each evaluated edge scored by how much removing it worsens the metric",
    "eap": "edge attribution patching (Syed et al. 2023): one gradient, each edge scored by gradient x "
           "(clean - ablated activation)",
    "eap-ig": "EAP with integrated gradients on the input embedding (Hanna et al. 2024; MIB's rule, k = 0..m-1)",
    "eap-ig-activations": "EAP-IG interpolating each sender's activation instead of the input embedding",
    "clean-corrupted": "EAP with the gradient averaged over the clean and the corrupted end only",
    "information-flow": "information-flow routes (Ferrando & Voita 2024): edges scored by their share of the "
                        "receiver's input in one clean forward pass, no gradient, no ablation; chosen greedily "
                        "from the logits down",
    "edge-patching": "every edge ablated alone and its exact effect measured (the reference EAP approximates)",
    "learned-masks": "Edge Pruning (Bhaskar et al. 2024): a mask over edges learned by gradient descent with a "
                     "sparsity penalty; scored by each edge's keep probability",
}


def cell(value) -> str:
    """A paper's figure as printed there (6 significant digits, no rounding to ours), "–" for none."""
    return "–" if value is None else f"{value:g}"


def paper_model(label: str, path: str | None = None) -> str | None:
    """The paper's name for a report's model (its label, or the directory it was loaded from), or None."""
    for key in (label, Path(path).name if path else None):
        if key is not None and key.strip().lower() in _ALIASES:
            return _ALIASES[key.strip().lower()]
    return None


def method_lines(methods) -> list[str]:
    """One markdown line per method named (in order, once each): what it is."""
    seen = list(dict.fromkeys(methods))
    unknown = [m for m in seen if m not in METHODS]
    if unknown:
        raise KeyError(f"no description for the methods {unknown}; add one to circuitlab.paper.METHODS")
    return [f"- **{m}**: {METHODS[m]}." for m in seen]


def setup_difference(n_layer: int, n_head: int, d_model: int, n_params: int | None, examples: str,
                     answer_space: str | None) -> str:
    """The line under a table with the paper's figures: where our setup differs from the paper's."""
    size = f"{n_params / 1e6:.1f} M parameters, " if n_params else ""
    fmt = {"answer": "answer read as ' c' (the prompt without its trailing space; the bundled models were "
                     "finetuned so)", "prompt": "the paper's format (trailing space in the prompt, c alone)"}
    answer = f"; answer format: {fmt.get(answer_space, answer_space)}, the paper's: trailing space in the prompt" \
        if answer_space else ""
    return (f"*Paper columns*: GPT-2 small (124 M parameters, 12 x 12 heads, d_model 768, pretrained by OpenAI); "
            f"ours: {size}{n_layer} x {n_head} heads, d_model {d_model}, pretrained here (weights/README.md); "
            f"{examples}{answer}.")
