"""circuits.py refuses every bad input before any work: exit status 2, one line
"circuits.py COMMAND: error: ..." naming the flag or file, no traceback.

The commands run in-process on model directories that hold only config.json (and metadata.json):
loading a model or building an eval set fails the test, so each check must come before them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import circuits
from circuitlab import study as S
from minigpt2 import GPT2Config

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"alpha": GPT2Config(n_layer=2, n_head=2, d_model=16, d_mlp=24, n_ctx=64),
          "beta": GPT2Config(n_layer=2, n_head=2, d_model=16, d_mlp=24, n_ctx=64),
          "gamma": GPT2Config(n_layer=3, n_head=2, d_model=16, d_mlp=24, n_ctx=64)}
CIRCUIT = {"model": "alpha", "config": {"n_layer": 2, "n_head": 2}, "label": "Alpha", "threshold": 0.03,
           "ablated_heads": [[0, 1]], "kept_heads": [[0, 0], [1, 0], [1, 1]]}
METADATA = {"listed": "[1, 2]", "broken": "{not json", "badsize": json.dumps({"data": {"master_size": "many"}}),
            "badspace": json.dumps({"answer_space": "space"})}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    paths = {"root": root, "file": root / "a_file.txt", "empty_dir": root / "empty"}
    paths["file"].write_text("not a directory\n")
    paths["empty_dir"].mkdir()
    for name, cfg in SHAPES.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
        paths[name] = root / name
    for name, text in METADATA.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(SHAPES["alpha"].to_hf_dict()))
        (root / name / "metadata.json").write_text(text)
        paths[name] = root / name
    circuit_files = {"circuit": CIRCUIT, "nope": CIRCUIT | {"label": "Nope"},
                     "outside": CIRCUIT | {"kept_heads": [[0, 99]], "ablated_heads": []},
                     "headless": {k: v for k, v in CIRCUIT.items() if not k.endswith("_heads")},
                     "triple": CIRCUIT | {"ablated_heads": [[0, 1, 2]]},
                     "big": {k: v for k, v in CIRCUIT.items() if k != "kept_heads"} | {"config": {"n_layer": 12,
                                                                                             "n_head": 12}}}
    for name, c in circuit_files.items():
        paths[name] = root / f"{name}.json"
        paths[name].write_text(json.dumps(c))
    paths["notjson"] = root / "notjson.json"
    paths["notjson"].write_text("{")
    return paths


@pytest.fixture(autouse=True)
def no_work(monkeypatch):
    """Loading a model or building data means validation came too late."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded or data built before the bad input was refused")

    for name in ("models", "eval_batch", "single_batch", "exclude"):
        monkeypatch.setattr(S.Session, name, property(refuse))
    monkeypatch.setattr("minigpt2.load_pretrained", refuse)
    monkeypatch.setattr("circuitlab.study.load_pretrained", refuse)
    monkeypatch.setattr("tpp.make_eval_set", refuse)


def run(argv, capsys) -> tuple[int, str]:
    try:
        rc = circuits.main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


MODELS = ["--models", "Alpha={alpha}", "Beta={beta}"]
EDGE = ["acdc", "eap"]
CASES = [  # argv (placeholders {name} are fixture paths), what the error line must name
    # every command's shared flags
    (["baseline", "--examples", "0"], "--examples"),
    (["baseline", "--examples", str(10**12)], "--examples"),
    (["baseline", "--examples", "many"], "--examples"),
    (["baseline", "--single-examples", "-5"], "--single-examples"),
    (["baseline", "--seed", "-1"], "--seed"),
    (["baseline", "--data-seed", "-2"], "--data-seed"),
    (["baseline", "--master-size", "-3"], "--master-size"),
    (["baseline", "--master-size", str(10**12)], "--master-size"),
    (["baseline", "--threads", "-1"], "--threads"),
    (["baseline", "--threads", "0"], "--threads"),
    (["baseline", "--answer-space", "space"], "--answer-space"),
    (["baseline", "--models", "{root}/nowhere"], "no model at"),
    (["baseline", "--models", "=x"], "--models"),
    (["baseline", "--models", "A={alpha}", "A={beta}"], "share a label"),
    (["baseline", "--out", "{file}"], "--out"),
    (["baseline", "--out", "{file}/sub"], "--out"),
    (["baseline", "--out", "{root}"], "--out"),  # a directory circuits.py did not write: it would be replaced
    (["baseline", "--models", "{listed}"], "metadata.json"),
    (["baseline", "--models", "{broken}"], "metadata.json"),
    (["baseline", "--models", "{badsize}"], "data.master_size"),
    (["baseline", "--models", "{badspace}"], "answer_space"),
    (["nosuch"], "invalid choice"),
    ([], "required"),
    (["baseline", "--bogus"], "--bogus"),
    # sweep
    (["sweep", "--examples", "5000"], "--examples"),
    (["sweep", "--examples", "-1"], "--examples"),
    (["sweep", "--metrics", "bleu"], "--metrics"),
    (["sweep", "--ablation", "none"], "--ablation"),
    (["sweep", "--models", "Alpha={alpha}", "Gamma={gamma}"], "Gamma"),
    # search
    (["search", "--threshold", "1.5"], "--threshold"),
    (["search", "--threshold", "-1", "--drop", "absolute"], "--threshold"),
    (["search", "--threshold", "nan"], "--threshold"),
    (["search", "--threshold", "inf", "--drop", "absolute"], "--threshold"),
    (["search", "--examples", "0"], "--examples"),
    (["search", "--examples", "200", "--eval-examples", "100"], "--examples"),
    (["search", "--eval-examples", "0"], "--eval-examples"),
    (["search", "--rigorous", "50"], "--rigorous"),
    (["search", "--rigorous", "4000"], "--rigorous"),
    (["search", "--rigorous", "-1"], "--rigorous"),
    (["search", "--speculate", "0"], "--speculate"),
    (["search", "--metric", "bleu"], "--metric"),
    (["search", "--order", "sideways"], "--order"),
    (["search", "--models", "Alpha={alpha}", "Gamma={gamma}"], "different shapes"),
    # transfer
    (["transfer"], "--circuits"),
    (["transfer", "--circuits", "{root}/nowhere.json"], "nowhere.json"),
    (["transfer", "--circuits", "{notjson}"], "notjson.json"),
    (["transfer", "--circuits", "{root}"], "is a folder"),
    (["transfer", "--circuits", "{big}"], "12 layers x 12 heads"),
    (["transfer", "--circuits", "{triple}"], "ablated_heads[0]"),
    (["transfer", "--circuits", "{circuit}", "{circuit}"], "both named 'Alpha'"),
    (["transfer", "--circuits", "{circuit}", "--examples", "-1"], "--examples"),
    (["transfer", "--circuits", "{circuit}", "--models", "Alpha={alpha}", "Gamma={gamma}"], "Gamma"),
    # classify
    (["classify", "--c-threshold", "-1"], "--c-threshold"),
    (["classify", "--c-threshold", "nan"], "--c-threshold"),
    (["classify", "--c-threshold", "1.5"], "--c-threshold"),
    (["classify", "--score-threshold", "2"], "--score-threshold"),
    (["classify", "--min-fraction", "0"], "--min-fraction"),
    (["classify", "--examples", "0"], "--examples"),
    (["classify", "--examples", "3001"], "--examples"),
    (["classify", "--circuits", "{nope}"], "'Nope' matches none of the models ['Alpha', 'Beta']"),
    (["classify", "--circuits", "{outside}"], "kept_heads[0]"),
    (["classify", "--circuits", "{headless}"], "headless.json"),
    (["classify", "--circuits", "{big}"], "12 layers x 12 heads"),
    # generate
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--prompt", "  "], "--prompt"),
    # more new tokens than the context holds after the prompt (n_ctx 64): refused with the count that fits
    (["generate", "--max-new-tokens", "1000000000"], "at most 51 new tokens fit"),
    (["generate", "--prompt", "one " * 70], "--prompt"),
    (["study", "--max-new-tokens", "100"], "--max-new-tokens 100"),
    # study
    (["study", "--examples", "0"], "--examples"),
    (["study", "--sweep-examples", "5000"], "--sweep-examples"),
    (["study", "--classify-examples", "0"], "--classify-examples"),
    (["study", "--search-examples", "4000"], "--search-examples"),
    (["study", "--rigorous", "50"], "--rigorous"),
    (["study", "--threshold", "2"], "--threshold"),
    (["study", "--acdc-models", "Nope"], "--acdc-models"),
    (["study", "--acdc-threshold", "-1"], "--acdc-threshold"),
    (["study", "--eap-top-k", "0"], "--eap-top-k"),
    (["study", "--edge-examples", "0"], "--edge-examples"),
    (["study", "--mib-methods", "eap", "guesswork"], "--mib-methods eap guesswork: unknown edge methods"),
    (["study", "--mib-examples", "1"], "--mib-examples"),
    (["eap", "--ig-rule", "newest"], "--ig-rule"),
    (["study", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["study", "--models", "Alpha={alpha}", "Gamma={gamma}"], "different shapes"),
    # acdc and eap (circuitlab.edge_cli)
    (["acdc", "--examples", "0"], "--examples"),
    (["acdc", "--examples", str(10**9)], "--examples"),
    (["acdc", "--seed", "-1"], "--seed"),
    (["acdc", "--threads", "0"], "--threads"),
    (["acdc", "--threshold", "-1"], "--threshold"),
    (["acdc", "--threshold", "2", "--threshold-mode", "relative"], "--threshold"),
    (["acdc", "--threshold-mode", "sideways"], "--threshold-mode"),
    (["acdc", "--metric", "bleu"], "--metric"),
    (["acdc", "--device", "nonsense"], "--device"),
    (["acdc", "--model", "{root}/nowhere"], "no model at"),
    (["acdc", "--model", "{listed}"], "metadata.json"),
    (["acdc", "--out", "{file}"], "--out"),
    (["eap", "--steps", "0"], "--steps"),
    (["eap", "--top-k", "0"], "--top-k"),
    (["eap", "--threshold", "nan"], "--threshold"),
    (["eap", "--method", "guess"], "--method"),
    (["eap", "--method", "acdc"], "--method"),  # ACDC is its own command
    (["eap", "--top-k", "5", "--threshold", "0.1"], "not allowed with"),
    # --device on every command that loads a model; --dtype where the batched engine runs
    *[([cmd, "--device", dev], "--device") for cmd in ("baseline", "sweep", "search", "classify", "generate", "study",
                                                        "acdc", "eap") for dev in ("nonsense", "cuda:99", "meta")],
    (["transfer", "--circuits", "{circuit}", "--device", "cuda:99"], "--device"),
    *[([cmd, "--dtype", "fp16"], "--dtype") for cmd in ("sweep", "search", "study", "acdc", "eap")],
    (["baseline", "--dtype", "bf16"], "--dtype"),  # the paper's tables: no --dtype
]


@pytest.mark.parametrize("argv,named", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_a_bad_input_is_one_named_line(files, tmp_path, capsys, argv, named):
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    named = named.format(**{k: str(v) for k, v in files.items()})
    if argv and argv[0] in EDGE:
        argv += [] if "--model" in argv else ["--model", str(files["alpha"])]
    elif argv and argv[0] != "nosuch":
        argv += [] if "--models" in argv else [a.format(**{k: str(v) for k, v in files.items()}) for a in MODELS]
    if argv and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    rc, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("circuits.py") and ": error: " in lines[0], lines[0]
    assert named in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_models_of_different_shapes_are_named_with_their_shapes(files, capsys):
    rc, err = run(["sweep", "--models", f"Alpha={files['alpha']}", f"Gamma={files['gamma']}"], capsys)
    assert rc == 2 and "Alpha" in err and "2x2" in err and "Gamma" in err and "3x2" in err, err


def test_a_bad_input_exits_2_in_a_subprocess(files):
    """The script's own exit status (sys.exit(main())), for an error found after parsing."""
    p = subprocess.run([sys.executable, "circuits.py", "classify", "--models", f"Alpha={files['alpha']}",
                        "--circuits", str(files["nope"]), "--out", str(files["root"] / "o")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"circuits.py classify: error: circuit file {files['nope']}: its \"label\" 'Nope' matches none of the "
        "models ['Alpha']. Fix: set its \"label\" to one of them, or pass that model in --models as Nope=DIR"], p.stderr


# ---------------------------------------------------------------- --device and --dtype
NO_CUDA = pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")


@NO_CUDA
@pytest.mark.parametrize("cmd", ["baseline", "sweep", "search", "classify", "generate", "study", "acdc", "eap"])
def test_cuda_on_a_machine_without_it_is_refused_while_parsing(files, tmp_path, capsys, cmd):
    where = ["--model", str(files["alpha"])] if cmd in EDGE else ["--models", f"Alpha={files['alpha']}"]
    rc, err = run([cmd, *where, "--device", "cuda", "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and err.strip().splitlines() == [
        f"circuits.py {cmd}: error: argument --device: cuda: this machine has no CUDA device; pass cpu "
        "(or leave --device out: cuda if available, else cpu)"], err


def test_the_device_type_checks_the_machine(monkeypatch):
    """clikit.device, the one validator of every --device: the machine's CUDA devices decide."""
    import argparse

    import torch

    from clikit import default_device, device

    assert device("cpu") == "cpu" and device(" cpu ") == "cpu"
    for bad, named in (("nonsense", "is not a torch device"), ("", "is not a torch device"),
                       ("meta", "a meta device cannot run the model")):
        with pytest.raises(argparse.ArgumentTypeError, match=named):
            device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(argparse.ArgumentTypeError, match="no CUDA device; pass cpu"):
        device("cuda")
    assert default_device() == "cpu" and default_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device("cuda") == "cuda" and device("cuda:1") == "cuda:1" and default_device() == "cuda"
    with pytest.raises(argparse.ArgumentTypeError, match=r"has 2 CUDA devices \(cuda:0 to cuda:1\); pass one"):
        device("cuda:2")


def parse(files, *argv):
    return circuits.parser.parse_args([*argv, "--models", f"Alpha={files['alpha']}"])


def test_device_reaches_the_session(files):
    from clikit import default_device

    assert circuits.session(parse(files, "baseline", "--device", "cpu")).device == "cpu"
    assert circuits.session(parse(files, "generate")).device == default_device()  # cuda if available, else cpu


def test_dtype_reaches_every_stage_of_the_study(files):
    args = parse(files, "study", "--dtype", "bf16")
    opts = circuits.study_options(args)
    assert (opts.sweep_dtype, opts.search.dtype, opts.edges.dtype) == ("bf16", "bf16", "bf16")
    opts = circuits.study_options(parse(files, "study"))
    assert (opts.sweep_dtype, opts.search.dtype, opts.edges.dtype) == ("fp32", "fp32", "fp32")
    assert circuits.search_options(parse(files, "search", "--dtype", "bf16")).dtype == "bf16"


class Reached(Exception):
    """Raised by a stand-in for the API: the command got that far, with these arguments."""


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("cmd,target", [("sweep", "head_sweep"), ("search", "find_circuits"), ("study", "study")])
def test_dtype_reaches_the_commands(files, tmp_path, monkeypatch, capsys, cmd, target, dtype):
    got = {}

    def stand_in(ses, out, *args, **kwargs):
        got.update(args=args, kwargs=kwargs, device=ses.device)
        raise Reached

    monkeypatch.setattr(S, target, stand_in)
    with pytest.raises(Reached):
        circuits.main([cmd, "--models", f"Alpha={files['alpha']}", "--dtype", dtype, "--device", "cpu",
                       "--out", str(tmp_path / "out")])
    assert got["device"] == "cpu"
    if cmd == "sweep":
        assert got["kwargs"]["dtype"] == dtype
    elif cmd == "search":
        assert got["args"][0].dtype == dtype
    else:
        opts = got["args"][0]
        assert (opts.sweep_dtype, opts.search.dtype, opts.edges.dtype) == (dtype,) * 3


def test_make_demo_runs_the_study_at_sizes_circuits_py_accepts(tmp_path, monkeypatch):
    """`make demo` passes the Makefile's DEMO_SIZES to `circuits.py study`: flags the study takes, checked as
    a run checks them on the bundled models (before any model is loaded), each at most the paper's size."""
    make = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    sizes = re.search(r"^DEMO_SIZES := (.*)$", make, re.M).group(1).split()
    assert re.search(r"^demo:.*\n\t\$\(BIN\)/python circuits.py study --out \S+ \$\(DEMO_SIZES\)$", make, re.M)
    monkeypatch.chdir(ROOT)
    args = circuits.parser.parse_args(["study", "--out", str(tmp_path / "demo"), *sizes])
    circuits.setup(args)
    opts = circuits.study_options(args)
    given = dict(zip(sizes[::2], map(int, sizes[1::2])))
    assert given == {"--examples": args.examples, "--single-examples": args.single_examples,
                     "--sweep-examples": opts.sweep_examples, "--search-examples": opts.search.n_examples,
                     "--edge-examples": opts.edges.n_examples, "--mib-examples": opts.edges.mib_examples}
    paper = {"--examples": 3000, "--single-examples": 1150, "--sweep-examples": 100, "--search-examples": 100,
             "--edge-examples": 50, "--mib-examples": S.EdgeOptions.mib_examples}
    assert all(given[k] <= paper[k] for k in given)
