"""Shared fixtures for the minigpt2 tests: tiny random GPT-2s and their transformers twins.

Sizes are odd and distinct (after Hugging Face's GPT-2 tests: batch 13, sequence 7,
vocab 99, width 32, MLP 37; 3 layers of 4 heads, context 23), so that a swapped
axis fails loudly instead of broadcasting. Every parameter is random, biases and
layer-norm gains included, so that no term of the forward is zero by accident.

Property tests build their models through the session-scoped factories below
(hypothesis refuses function-scoped fixtures inside @given).

One ``model`` fixture for every module: a module declares the random model it works on as
``MODEL_ARGS = dict(cfg=..., seed=..., std=..., dtype=...)`` (make_model's arguments) and its tests
share that one, read-only; a module without it gives each test a fresh TINY model. The planted
models (known answers for circuit finders and classifiers) are defined here once each:
``planted_path_model`` (one input -> head -> head -> logits path, PLANTED), ``planted_writer_model``
(one head writes a token's embedding) and ``planted_attention_model`` (heads attending to position
0, to themselves, to the previous position).

The device: MINIGPT2_TEST_DEVICE (default "cpu"; e.g. "cuda" or "cuda:1") is where the
``device`` fixture, ``tl_twin`` and ``bundled_base`` put models and tensors, and, in modules
marked ``pytestmark = pytest.mark.on_device``, the shared ``model``, ``tokens``, ``new_model``
and ``hf_model``; a test that asks for it is skipped when CUDA is asked for and absent. bench/device_suite.py runs
the suite so on a GPU.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minigpt2 import GPT2, GPT2Config

TINY = GPT2Config(n_layer=3, n_head=4, d_model=32, d_mlp=37, n_ctx=23, vocab_size=99)
BATCH, SEQ = 13, 7


def randomize_(module: torch.nn.Module, seed: int, std: float) -> torch.nn.Module:
    """Fill every parameter: weights ~ U with standard deviation ``std``, biases smaller,
    layer-norm gains near 1. Works on minigpt2 and transformers models alike (both name
    their layer norms ln*). uniform_ because it is several times faster than normal_,
    which matters for the GPT-2-small-size oracle."""
    gen = torch.Generator().manual_seed(seed)
    half_width = std * 3**0.5
    with torch.no_grad():
        for name, p in module.named_parameters():
            if re.search(r"(^|\.)ln(_|\d)", name) and name.endswith("weight"):  # ln1, ln_final, transformers' ln_1, ln_f
                p.uniform_(0.8, 1.2, generator=gen)
            elif name.endswith("bias"):
                p.uniform_(-half_width / 2, half_width / 2, generator=gen)
            else:
                p.uniform_(-half_width, half_width, generator=gen)
    return module


def make_model(cfg: GPT2Config = TINY, seed: int = 0, std: float = 0.2, device=None) -> GPT2:
    """A random model (the weights drawn on the CPU, so the same on every device), moved to ``device``."""
    return randomize_(GPT2(cfg), seed, std).eval().to(device or "cpu")


def make_tokens(batch: int = BATCH, seq: int = SEQ, vocab: int = TINY.vocab_size, seed: int = 0,
                device=None) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device or "cpu")


def env_device_name() -> str:
    return os.environ.get("MINIGPT2_TEST_DEVICE", "").strip() or "cpu"


def resolve_test_device() -> torch.device:
    """MINIGPT2_TEST_DEVICE as a torch.device; pytest.skip when it names CUDA and there is none."""
    name = env_device_name()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise pytest.UsageError(f"MINIGPT2_TEST_DEVICE={name!r} is not a torch device; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            pytest.skip(f"MINIGPT2_TEST_DEVICE={name}, but this machine has no CUDA device")
        if (device.index or 0) >= torch.cuda.device_count():
            pytest.skip(f"MINIGPT2_TEST_DEVICE={name}, but this machine has {torch.cuda.device_count()} CUDA devices")
    return device


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the tests put models and tensors: MINIGPT2_TEST_DEVICE (default cpu)."""
    return resolve_test_device()


# ---------------------------------------------------------------------- planted models: known answers
PLANTED = [("input", "a0.h1<v>"), ("a0.h1", "a1.h2<v>"), ("a1.h2", "logits")]  # planted_path_model's path


def planted_path_model() -> GPT2:
    """2 layers x 3 heads, d_model 24, where the logits depend on one path: input -> a0.h1 (value)
    -> a1.h2 (value) -> logits.

    Only a0.h1 and a1.h2 write (the other heads' W_O and the MLPs' c_proj are zero), every
    head attends uniformly (W_Q = W_K = 0), and the residual stream has three blocks of 8
    dimensions: tokens write [0, 8) and [16, 24), a0.h1 reads [0, 8) and writes [8, 16),
    a1.h2 reads [8, 16) and writes [16, 24) strongly. Token embeddings and head outputs sum
    to zero over dimensions and token embeddings share one norm, so that resampling a token
    moves no layer norm's mean and, off the path, barely its scale.
    """
    cfg = GPT2Config(n_layer=2, n_head=3, d_model=24, d_mlp=37, n_ctx=16, vocab_size=99)
    m = GPT2(cfg).double()
    gen = torch.Generator().manual_seed(0)

    def zero_sum(rows: int, cols: int) -> torch.Tensor:
        w = torch.randn(rows, cols, generator=gen, dtype=torch.double)
        return w - w.mean(1, keepdim=True)

    with torch.no_grad():
        for name, p in m.named_parameters():
            p.fill_(1.0 if name.split(".")[-2].startswith("ln") and name.endswith("weight") else 0.0)
        wte = torch.zeros(99, 24, dtype=torch.double)
        wte[:, list(range(8)) + list(range(16, 24))] = zero_sum(99, 16)
        m.wte.weight.copy_(3 * wte / wte.norm(dim=1, keepdim=True))
        for blk in m.blocks:
            blk.mlp.c_fc.weight.copy_(torch.randn(37, 24, generator=gen, dtype=torch.double))
        a0, a1 = m.blocks[0].attn, m.blocks[1].attn
        v = 2 * 24  # c_attn rows: W_Q, W_K, W_V, each head-major (8 rows a head)
        a0.c_attn.weight[v + 8:v + 16, 0:8] = torch.randn(8, 8, generator=gen, dtype=torch.double)
        a0.c_proj.weight[8:16, 8:16] = 2 * zero_sum(8, 8).T  # W_O of head 1 -> dims [8, 16)
        a1.c_attn.weight[v + 16:v + 24, 8:16] = torch.randn(8, 8, generator=gen, dtype=torch.double)
        a1.c_proj.weight[16:24, 16:24] = 4 * zero_sum(8, 8).T  # W_O of head 2 -> dims [16, 24)
    return m.eval()


def planted_writer_model(cfg: GPT2Config, layer: int, head: int, target: int) -> GPT2:
    """A model whose head (layer, head) writes token ``target``'s embedding into the residual
    stream, whatever the input: its value is a constant (bias only) and W_O maps it onto
    wte[target]. Every other weight is GPT-2's small random init (torch.manual_seed(0))."""
    torch.manual_seed(0)
    model = GPT2(cfg).eval()
    d, dh = cfg.d_model, cfg.d_head
    with torch.no_grad():
        model.wte.weight[target] = torch.randn(d) / d**0.5 * 3  # a long embedding: a clear winner at the output
        attn = model.blocks[layer].attn
        v_rows = slice(2 * d + head * dh, 2 * d + (head + 1) * dh)
        attn.c_attn.weight[v_rows] = 0
        v0 = torch.ones(dh)
        attn.c_attn.bias[v_rows] = v0
        attn.c_proj.weight[:, head * dh:(head + 1) * dh] = 20 * torch.outer(model.wte.weight[target], v0) / (v0 @ v0)
    return model


def planted_attention_model(cfg: GPT2Config) -> GPT2:
    """Layer 0: head 0 attends to position 0, head 1 to itself, head 2 to the previous
    position; head 3 and layer 1 keep GPT-2's small random init (near-uniform attention).

    Position p's embedding is a spike 20 * e_p on residual dimension p (p < n_ctx <= d_model),
    so after the first layer norm dimension p marks position p; Q and K read those dimensions.
    """
    torch.manual_seed(0)
    model = GPT2(cfg).eval()
    d, dh, n = cfg.d_model, cfg.d_head, cfg.n_ctx
    q0, k0 = 0, d  # row offsets of W_Q and W_K in c_attn
    with torch.no_grad():
        model.wpe.weight.zero_()
        model.wpe.weight[torch.arange(n), torch.arange(n)] = 20.0
        w, b = model.blocks[0].attn.c_attn.weight, model.blocks[0].attn.c_attn.bias
        for h in range(3):
            w[q0 + h * dh:q0 + (h + 1) * dh] = 0
            w[k0 + h * dh:k0 + (h + 1) * dh] = 0
        b[q0 + 0] = 5.0  # head 0: a constant query ...
        w[k0 + 0, 0] = 1.0  # ... matching the key of position 0
        for i in range(dh):  # head 1: query and key both read "my position"
            w[q0 + dh + i, i] = 1.0
            w[k0 + dh + i, i] = 1.0
        for i in range(1, dh):  # head 2: the query at p looks for the key of p - 1
            w[q0 + 2 * dh + i - 1, i] = 1.0
            w[k0 + 2 * dh + i - 1, i - 1] = 1.0
    return model


def hf_config(cfg: GPT2Config):
    import transformers

    return transformers.GPT2Config(
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.d_model, n_inner=cfg.d_mlp, n_positions=cfg.n_ctx,
        vocab_size=cfg.vocab_size, layer_norm_epsilon=cfg.layer_norm_eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        # ids 50256 would lie outside a tiny vocabulary
        bos_token_id=None if cfg.vocab_size <= 50256 else 50256,
        eos_token_id=None if cfg.vocab_size <= 50256 else 50256,
        attn_implementation="eager",  # the textbook path, as the oracle
    )


def make_hf_model(cfg: GPT2Config = TINY, seed: int = 0, std: float = 0.2):
    """A transformers GPT2LMHeadModel with random weights (built on the meta device: no init to waste)."""
    import transformers

    transformers.logging.set_verbosity_error()
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(hf_config(cfg))
    hf = hf.to_empty(device="cpu")
    hf.tie_weights()
    assert hf.lm_head.weight is hf.transformer.wte.weight
    return randomize_(hf, seed, std).eval()


def hub_layout(hf_state_dict: dict[str, torch.Tensor], n_ctx: int) -> dict[str, torch.Tensor]:
    """The openai-community/gpt2 file's layout: no "transformer." prefix, no lm_head, and the
    causal-mask buffers attn.bias [1, 1, n_ctx, n_ctx] and attn.masked_bias of the old releases."""
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in hf_state_dict.items() if k != "lm_head.weight"}
    layers = {int(k.split(".")[1]) for k in sd if k.startswith("h.")}
    for i in layers:
        sd[f"h.{i}.attn.bias"] = torch.ones(n_ctx, n_ctx).tril().view(1, 1, n_ctx, n_ctx)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return sd


def edit_safetensors(path: Path, edit) -> None:
    """Rewrite a safetensors file through ``edit(dict of tensors)`` (in place)."""
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny tensors: with two threads, synchronisation costs more than the arithmetic
    (a tiny forward took 80 ms instead of 1 ms on a busy two-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_cfg() -> GPT2Config:
    return TINY


def test_device_of(request) -> torch.device:
    """The test device for a module marked ``pytestmark = pytest.mark.on_device``; the CPU elsewhere."""
    return resolve_test_device() if request.node.get_closest_marker("on_device") else torch.device("cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "on_device: the shared model fixtures of this module live on "
                                       "MINIGPT2_TEST_DEVICE (conftest's device)")


@pytest.fixture(scope="module")
def new_model(request):
    """Factory ``new_model(cfg=TINY, seed=0)``: a fresh random model (usable inside @given)."""
    device = test_device_of(request)
    return lambda cfg=TINY, seed=0, std=0.2: make_model(cfg, seed, std, device=device)


@pytest.fixture(scope="session")
def new_tokens():
    """Factory ``new_tokens(batch, seq, vocab, seed)``."""
    return make_tokens


def module_model(module, device=None) -> GPT2:
    """The random model a test module works on: ``make_model(**MODEL_ARGS)`` for a module that sets
    ``MODEL_ARGS = dict(cfg=..., seed=..., std=..., dtype=...)`` (make_model's arguments, and the dtype
    to convert to), else ``make_model()`` (TINY, seed 0)."""
    spec = dict(getattr(module, "MODEL_ARGS", {}))
    dtype = spec.pop("dtype", None)
    m = make_model(**spec, device=device)
    return m if dtype is None else m.to(dtype)


_SHARED_MODELS: dict[tuple[str, str], GPT2] = {}  # (module, device) -> the model its tests share


@pytest.fixture
def model(request) -> GPT2:
    """The test module's model (:func:`module_model`). A module that sets ``MODEL_ARGS`` shares one
    among its tests, built once (its tests read it, never change it); elsewhere each test gets a
    fresh TINY model it may change (add hooks, switch flags, train) without touching the next test's."""
    device = test_device_of(request)
    if not hasattr(request.module, "MODEL_ARGS"):
        return module_model(request.module, device)
    key = (request.module.__name__, str(device))
    if key not in _SHARED_MODELS:
        _SHARED_MODELS[key] = module_model(request.module, device)
    return _SHARED_MODELS[key]


@pytest.fixture(scope="module")
def pair(request, tl_twin):
    """(the test module's model (:func:`module_model`, on the CPU), its unprocessed TransformerLens
    twin), built once per module: tests read them, never change them. test_tl_oracle has its own
    ``pair``, over a random GPT-2 small and the bundled base."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = module_model(request.module)
        return model, tl_twin(model)


@pytest.fixture
def tokens(request) -> torch.Tensor:
    return make_tokens(device=test_device_of(request))


@pytest.fixture
def hf_model(request):
    return make_hf_model().to(test_device_of(request))


@pytest.fixture
def checkpoint(tmp_path, model) -> Path:
    """``model`` written by minigpt2's save_pretrained: a directory with model.safetensors and config.json."""
    path = tmp_path / "checkpoint"
    model.save_pretrained(path)
    return path


STUDY_TINY = GPT2Config(n_layer=2, n_head=2, d_model=16, d_mlp=24, n_ctx=64, vocab_size=50257)  # GPT-2's tokens


def save_study_models(root: Path, labels: list[str]) -> list[str]:
    """Tiny models with GPT-2's vocabulary, saved where circuits.py reads them: label i is
    GPT2(STUDY_TINY) from torch.manual_seed(i), its embeddings scaled by 20 (a less uniform output,
    so that ablations move the metrics), in root/label.lower(). Returns the --models specs LABEL=DIR."""
    specs = []
    for i, label in enumerate(labels):
        torch.manual_seed(i)
        model = GPT2(STUDY_TINY)
        with torch.no_grad():
            model.wte.weight.mul_(20)
        model.save_pretrained(root / label.lower())
        specs.append(f"{label}={root / label.lower()}")
    return specs


READ_ONLY = Path("/sys/minigpt2-test")  # sysfs refuses new entries, to root too


def refuses_writes(d: Path) -> bool:
    try:
        d.mkdir()
    except OSError:
        return True
    d.rmdir()
    return False


needs_read_only_place = pytest.mark.skipif(not refuses_writes(READ_ONLY), reason="no read-only place on this machine")


# ---------------------------------------------------------------------- TransformerLens twins
@pytest.fixture(scope="session")
def tl_twin():
    """Factory ``tl_twin(model, hf_dir=None, **flags)``: TransformerLens's HookedTransformer computing
    ``model``'s function. The weights reach it as TransformerLens loads GPT-2: a transformers
    GPT2LMHeadModel (read from ``hf_dir``, or made from ``model``'s tensors in memory) through
    ``convert_gpt2_weights``, with no weight processing (no layer-norm folding, no centring).
    ``flags`` are HookedTransformerConfig fields (use_attn_result=True, ...). The twin lives on
    ``model``'s device (TransformerLens's own default would be cuda whenever there is one)."""
    def make(model: GPT2, hf_dir: Path | None = None, **flags):
        import warnings

        import transformers
        from transformer_lens import HookedTransformer, HookedTransformerConfig
        from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

        from minigpt2.weights import hf_tensors

        transformers.logging.set_verbosity_error()
        if hf_dir is not None:
            hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
        else:
            with torch.device("meta"):
                hf = transformers.GPT2LMHeadModel(hf_config(model.cfg))
            hf.load_state_dict(hf_tensors(model), strict=False, assign=True)  # lm_head: tied to wte below
            hf.tie_weights()
        c = model.cfg
        cfg = HookedTransformerConfig(
            n_layers=c.n_layer, d_model=c.d_model, n_ctx=c.n_ctx, d_head=c.d_head, n_heads=c.n_head, d_mlp=c.d_mlp,
            d_vocab=c.vocab_size, act_fn="gelu_new", normalization_type="LN", eps=c.layer_norm_eps,
            original_architecture="GPT2LMHeadModel", positional_embedding_type="standard",
            default_prepend_bos=False, init_weights=False, **{"device": str(model.device)} | flags)
        with warnings.catch_warnings():  # TransformerLens 3.9 deprecates HookedTransformer for its bridge
            warnings.simplefilter("ignore", DeprecationWarning)
            tl = HookedTransformer(cfg)  # not on the meta device: its IGNORE (-inf) buffer must be real
        tl.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                       center_unembed=False, fold_value_biases=False)
        return tl.eval()

    return make


@pytest.fixture(scope="session")
def bundled_base(device) -> GPT2:
    """weights/base, the bundled 12 x 12 model (d_model 144), loaded once, on the test device."""
    from minigpt2 import load_pretrained

    return load_pretrained(Path(__file__).resolve().parents[1] / "weights" / "base", device=device).eval()
