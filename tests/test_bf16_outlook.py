"""minigpt2.hardware.bf16_outlook: the notice a --dtype bf16 command prints before any work where bf16
cannot be faster than fp32 (issue 27), with /proc/cpuinfo's text injected."""

from __future__ import annotations

import pytest
import torch

from minigpt2 import GPT2, GPT2Config
from minigpt2.hardware import BF16_MIN_D_MODEL, bf16_outlook, cpu_flags

AVX2_EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme sse sse2 avx f16c fma avx2 bmi2
"""
ZEN4_EPYC = AVX2_EPYC.replace("7B12", "9B14").replace("avx2 bmi2", "avx2 bmi2 avx512f avx512bw avx512_bf16")
SAPPHIRE_RAPIDS = AVX2_EPYC.replace("AMD EPYC 7B12", "Intel Xeon Platinum 8481C").replace(
    "avx2 bmi2", "avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8")
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
GPT2_SMALL = 768


def test_cpu_without_bf16_units_gets_a_notice_naming_it():
    note = bf16_outlook(GPT2_SMALL, "cpu", cpuinfo=AVX2_EPYC)
    assert note is not None
    assert "AMD EPYC 7B12" in note and "avx512_bf16" in note and "fp32" in note


@pytest.mark.parametrize("cpuinfo", [ZEN4_EPYC, SAPPHIRE_RAPIDS, GRAVITON3])
def test_capable_cpu_and_gpt2_small_width_get_none(cpuinfo):
    assert bf16_outlook(GPT2_SMALL, "cpu", cpuinfo=cpuinfo) is None


def test_tiny_model_gets_a_notice_even_on_a_capable_cpu():
    model = GPT2(GPT2Config(n_layer=1, n_head=2, d_model=16, d_mlp=64, n_ctx=8, vocab_size=50))
    note = bf16_outlook(model, cpuinfo=ZEN4_EPYC)  # the model's device: the CPU
    assert note is not None and "d_model 16" in note and "too small" in note
    assert bf16_outlook(model.cfg, "cpu", cpuinfo=ZEN4_EPYC) == note  # a config works alike
    assert bf16_outlook(BF16_MIN_D_MODEL, "cpu", cpuinfo=ZEN4_EPYC) is None  # the threshold itself passes


def test_both_reasons_in_one_notice():
    note = bf16_outlook(16, "cpu", cpuinfo=AVX2_EPYC)
    assert "avx512_bf16" in note and "too small" in note


def test_right_or_wrong_metric_gets_a_notice():
    note = bf16_outlook(GPT2_SMALL, "cpu", metric_step=1.0, cpuinfo=ZEN4_EPYC)
    assert note is not None and "accuracy" in note and "re-checked in fp32" in note


def test_gpu_is_judged_by_its_bf16_support_not_by_width():
    assert bf16_outlook(16, "cuda", cuda_bf16=True, cpuinfo=AVX2_EPYC) is None
    assert "GPU" in bf16_outlook(GPT2_SMALL, "cuda", cuda_bf16=False)


def test_unreadable_cpuinfo_says_nothing_about_the_cpu():
    assert cpu_flags("processor : 0\n") is None
    assert bf16_outlook(GPT2_SMALL, "cpu", cpuinfo="processor : 0\n") is None


def test_cpu_flags_reads_x86_and_arm_lines():
    assert {"avx512_bf16", "avx2"} <= cpu_flags(ZEN4_EPYC)
    assert "bf16" in cpu_flags(GRAVITON3)


def test_refuses_what_has_no_width():
    with pytest.raises(TypeError, match="d_model"):
        bf16_outlook("gpt2", "cpu", cpuinfo=ZEN4_EPYC)


def test_this_machine_reads_without_error():
    flags = cpu_flags()
    assert flags is None or isinstance(flags, frozenset)
    note = bf16_outlook(GPT2_SMALL, torch.device("cpu"))
    assert note is None or note.startswith("bf16 will not be faster")


class Reached(Exception):
    """Raised by a stand-in for the study's API: the command got that far."""


@pytest.mark.parametrize("cmd,target,noted", [("sweep", "head_sweep", ["--dtype", "bf16"]),
                                              ("search", "find_circuits", ["--dtype", "bf16"]),
                                              ("sweep", "head_sweep", [])])
def test_circuits_py_prints_the_notice_before_any_work(tmp_path, monkeypatch, capsys, cmd, target, noted):
    """A model of d_model 16 (config.json only: loading it would fail) with --dtype bf16: the notice is on
    stderr before the command's work starts; with fp32, none."""
    import json

    import circuits
    from circuitlab import study as S

    (tmp_path / "tiny").mkdir()
    cfg = GPT2Config(n_layer=2, n_head=2, d_model=16, d_mlp=24, n_ctx=64)
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(cfg.to_hf_dict()))

    def stand_in(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(S, target, stand_in)
    with pytest.raises(Reached):
        circuits.main([cmd, "--models", f"Tiny={tmp_path / 'tiny'}", "--device", "cpu",
                       "--out", str(tmp_path / "out"), *noted])
    err = capsys.readouterr().err
    if noted:
        assert f"[{cmd}] note: bf16 will not be faster than fp32 here" in err and "d_model 16" in err
        assert ("accuracy" in err) == (cmd == "search")  # the search's default metric is accuracy
    else:
        assert "note:" not in err


def test_acdc_prints_the_notice_before_building_its_data(tmp_path, monkeypatch, capsys):
    import circuits
    from circuitlab import edge_cli
    from minigpt2 import save_pretrained

    model = GPT2(GPT2Config(n_layer=1, n_head=2, d_model=16, d_mlp=24, n_ctx=64))
    save_pretrained(model, tmp_path / "tiny")

    def stand_in(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(edge_cli, "build_data", stand_in)
    with pytest.raises(Reached):
        circuits.main(["acdc", "--model", str(tmp_path / "tiny"), "--dtype", "bf16", "--device", "cpu",
                       "--out", str(tmp_path / "out")])
    assert "[acdc] note: bf16 will not be faster than fp32 here" in capsys.readouterr().err
