"""Metrics against hand-computed values, and [V, B, vocab] stacks against per-variant loops."""

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tpp
from tpp import Example, encode_eval, make_examples, metrics

LN2 = math.log(2)


def test_hand_computed_values():
    # softmax([0, 0, ln 2]) = [1/4, 1/4, 1/2]
    logits = torch.tensor([[0.0, 0.0, LN2], [3.0, 1.0, 2.0]])
    target = torch.tensor([2, 2])
    assert metrics.cross_entropy(logits, target).tolist() == pytest.approx([LN2, -math.log(math.exp(2) /
                                                                      (math.exp(3) + math.e + math.exp(2)))])
    assert metrics.accuracy(logits, target).tolist() == [1.0, 0.0]
    assert metrics.logit_diff(logits, target, torch.tensor([0, 0])).tolist() == pytest.approx([LN2, -1.0])


def test_kl_hand_value_zero_on_itself_and_finite_where_p_is_zero():
    p = torch.tensor([[0.0, math.log(3)]])  # softmax -> [1/4, 3/4]
    q = torch.zeros(1, 2)  # uniform
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert metrics.kl_div(p, q).item() == pytest.approx(expected)
    assert metrics.kl_div(p, p).item() == pytest.approx(0.0, abs=1e-7)
    inf = torch.tensor([[0.0, -math.inf]])
    assert metrics.kl_div(inf, torch.tensor([[0.0, 5.0]])).item() == pytest.approx(-math.log(1 / (1 + math.exp(5))))
    assert metrics.kl_div(inf, inf).item() == 0.0


def test_mean_sem_hand_value():
    mean, sem = metrics.mean_sem(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean.item() == 2.5 and sem.item() == pytest.approx(math.sqrt(5 / 3) / 2)
    mean, sem = metrics.mean_sem(torch.tensor([[1.0, 3.0], [2.0, 2.0]]))
    assert mean.tolist() == [2.0, 2.0] and sem.tolist() == pytest.approx([1.0, 0.0])
    assert math.isnan(metrics.mean_sem(torch.tensor([5.0]))[1].item())
    with pytest.raises(ValueError, match="empty"):
        metrics.mean_sem(torch.zeros(3, 0))


@settings(max_examples=20, deadline=None)
@given(V=st.integers(1, 4), B=st.integers(1, 6), vocab=st.integers(2, 11), seed=st.integers(0, 2**31))
def test_variant_stacks_equal_per_variant_computation(V, B, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    stack = torch.randn(V, B, vocab, generator=g) * 3
    clean = torch.randn(B, vocab, generator=g)
    c, b = torch.randint(vocab, (B,), generator=g), torch.randint(vocab, (B,), generator=g)
    per_variant = {
        "ce": (metrics.cross_entropy(stack, c), [metrics.cross_entropy(x, c) for x in stack]),
        "acc": (metrics.accuracy(stack, c), [metrics.accuracy(x, c) for x in stack]),
        "ld": (metrics.logit_diff(stack, c, b), [metrics.logit_diff(x, c, b) for x in stack]),
        "kl": (metrics.kl_div(clean, stack), [metrics.kl_div(clean, x) for x in stack]),
    }
    for name, (batched, looped) in per_variant.items():
        assert batched.shape == (V, B), name
        torch.testing.assert_close(batched, torch.stack(looped), msg=name)
    means, sems = metrics.mean_sem(per_variant["ce"][0])
    assert means.shape == sems.shape == (V,)
    torch.testing.assert_close(means, torch.stack([metrics.mean_sem(x)[0] for x in per_variant["ce"][1]]))


def _batch():
    examples = [Example("all-are", "fish", "cat", "dog", "if all fish are cat and cat are dog then all fish are "),
                Example("all-are", "owl", "dog", "cat", "if all owl are dog and dog are cat then all owl are ")]
    return encode_eval(examples)


def test_summarize_and_final_position():
    batch = _batch()
    B, T, vocab = len(batch), batch.tokens.shape[1], 50257
    full = torch.zeros(3, B, T, vocab)
    for i in range(B):  # put the answer at each row's answer position only
        full[:, i, batch.answer_pos[i], batch.c_token[i]] = torch.tensor([10.0, 0.0, -10.0])
    final = metrics.final_position(full, batch)
    assert final.shape == (3, B, vocab)
    summary = metrics.summarize(final, batch)
    assert summary["accuracy"][0].tolist() == [1.0, 0.0, 0.0]
    assert summary["logit_diff"][0].tolist() == [10.0, 0.0, -10.0]
    assert summary["loss"][0][1].item() == pytest.approx(math.log(vocab))
    plain = metrics.summarize(final[0], batch)
    assert plain["accuracy"][0].ndim == 0 and f"{plain['accuracy'][0]:.2f}" == "1.00"


def test_summarize_refuses_full_sequence_logits():
    batch = _batch()
    with pytest.raises(ValueError, match="final_position"):
        metrics.summarize(torch.zeros(len(batch), batch.tokens.shape[1], 7), batch)


def test_low_precision_logits_are_scored_in_float32():
    logits = torch.tensor([[0.0, 0.0, LN2]], dtype=torch.bfloat16)
    assert metrics.cross_entropy(logits, torch.tensor([2])).dtype == torch.float32
    assert metrics.cross_entropy(logits, torch.tensor([2])).item() == pytest.approx(LN2, abs=1e-2)


# ---------------------------------------------------------------- the answer format travels with the model
class _Model:
    """Stands in for a model: tpp reads only its answer_space (minigpt2.load_pretrained sets it)."""

    def __init__(self, answer_space):
        self.answer_space = answer_space


def test_encode_eval_takes_the_models_format():
    examples = make_examples(4, seed=1)
    assert encode_eval(examples, model=_Model("answer")).space == "answer"
    assert encode_eval(examples, model=_Model("prompt")).space == "prompt"
    assert encode_eval(examples, model=_Model(None)).space == "prompt"  # unrecorded: the paper's
    assert encode_eval(examples).space == "prompt"
    same = encode_eval(examples, model=_Model("answer"))
    assert torch.equal(same.tokens, encode_eval(examples, space="answer").tokens)
    assert same.select([1, 0]).space == same.to("cpu").space == "answer"
    assert encode_eval(examples, single_token=True, model=_Model("prompt")).single_token


def test_a_format_the_model_was_not_finetuned_in_is_refused_naming_both():
    examples = make_examples(4, seed=1)
    with pytest.raises(ValueError, match=r"space='prompt', but the model was finetuned in 'answer'"):
        encode_eval(examples, space="prompt", model=_Model("answer"))
    paper = encode_eval(examples)
    logits = torch.zeros(len(paper), 50257)
    with pytest.raises(ValueError, match=r"batch is in the 'prompt' format .* finetuned in 'answer'"):
        metrics.summarize(logits, paper, model=_Model("answer"))
    with pytest.raises(ValueError, match=r"'answer_space' is 'sideways'|answer_space is 'sideways'"):
        metrics.summarize(logits, paper, model=_Model("sideways"))
    metrics.summarize(logits, paper, model=_Model("prompt"))  # the same format, an unknown one: scored
    metrics.summarize(logits, paper, model=_Model(None))
    single = encode_eval(make_examples(4, seed=1), single_token=True)
    metrics.summarize(logits, single, model=_Model("prompt"))  # the paper's second set: ' c' on every model


def test_a_loaded_model_knows_its_format(tmp_path):
    """load_pretrained records metadata.json's answer_space (or a card's eval_data.answer_space)."""
    from minigpt2 import GPT2, GPT2Config, load_pretrained

    root = Path(__file__).resolve().parents[1] / "weights"
    assert load_pretrained(root / "welterweight").answer_space == "answer"
    assert load_pretrained(root / "base").answer_space == "answer"  # its card's eval format
    GPT2(GPT2Config(n_layer=1, n_head=2, d_model=8, d_mlp=12, n_ctx=16, vocab_size=50257)).save_pretrained(tmp_path)
    assert load_pretrained(tmp_path).answer_space is None
    (tmp_path / "metadata.json").write_text(json.dumps({"answer_space": "prompt"}))
    assert load_pretrained(tmp_path).answer_space == "prompt"
    (tmp_path / "metadata.json").write_text("{broken")
    assert load_pretrained(tmp_path).answer_space is None  # the weights load all the same


def test_the_recipe_scores_a_bundled_finetune_in_its_format():
    """The docstring's recipe, on welterweight: the model's format scores well; the paper's is refused."""
    from minigpt2 import load_pretrained

    model = load_pretrained(Path(__file__).resolve().parents[1] / "weights" / "welterweight")
    ev = encode_eval(tpp.make_eval_set(40, seed=5), model=model)
    with torch.no_grad():
        final = model(ev.tokens, positions=ev.answer_pos)
    assert metrics.summarize(final, ev, model=model)["accuracy"][0] > 0.6
    paper = encode_eval(ev.examples, space="prompt")
    with torch.no_grad():
        wrong = model(paper.tokens, positions=paper.answer_pos)
    assert metrics.summarize(wrong, paper)["accuracy"][0] < 0.2  # the silent near-0 this refusal prevents
    with pytest.raises(ValueError, match="'prompt' format"):
        metrics.summarize(wrong, paper, model=model)
