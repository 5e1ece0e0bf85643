"""What the file system and odd inputs do to every reader and writer (issue 25): each ends in one
named error that names the file (CLI: one line, exit status 2), and nothing is left half-written.

  * every JSON reader over generated contents: nesting up to 100,000 levels, any JSON type, random
    bytes, a byte-order mark, sizes past the limit;
  * one rule for a byte-order mark in every text input (refused, named);
  * wrong-cause and vague messages: a pickle, a Git LFS pointer or a config.json given as weights, a
    FIFO as a circuit file, NaN/inf weights saved or loaded, save_pretrained onto a sharded
    checkpoint or a file;
  * writers under a full disk (ENOSPC injected at each write) and into a read-only place;
  * directories: written with the umask's mode, stale partial directories of dead processes removed.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import READ_ONLY, make_model, needs_read_only_place
from minigpt2 import GPT2Config, fileio, load_pretrained, save_pretrained
from minigpt2.weights import CheckpointError, read_index

import finetune.checkpoint as ckpt
from circuitlab import report
from circuitlab.circuitfile import load_circuit
from circuitlab.mib import from_mib_json
from circuitlab.task import read_metadata
from finetune.publish import lineage
from finetune.trainer import _logged_step
from tpp.jsonl import load_examples

CFG = GPT2Config(n_layer=2, n_head=2, d_model=16, d_mlp=24, n_ctx=11, vocab_size=99)
FUZZ = settings(deadline=None, database=None, max_examples=25,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])

# ------------------------------------------------------------------ every JSON reader
# name -> (file name it reads, how it is called on that file). Each either returns or raises a
# ValueError (FileNotFoundError for an absent file) whose message names the file.
READERS = {
    "fileio.load_json": ("x.json", lambda p: fileio.load_json(p)),
    "args.json / metadata.json (checkpoint.read_json_object)": ("args.json", lambda p: ckpt.read_json_object(p, "fix")),
    "state.json (checkpoint.read_state)": ("state.json", lambda p: ckpt.read_state(p.parent)),
    "complete.json (fileio.read_marker)": ("complete.json", lambda p: fileio.read_marker(p.parent)),
    "complete.json (checkpoint.damaged_files)": ("complete.json", lambda p: ckpt.damaged_files(p.parent)),
    "non_finite.json": ("non_finite.json", lambda p: ckpt.read_non_finite_note(p.parent)),
    "circuit file": ("circuit_x.json", lambda p: load_circuit(p)),
    "model metadata.json (circuitlab.task)": ("metadata.json", lambda p: read_metadata(p.parent)),
    "--init metadata.json (finetune.publish.lineage)": ("metadata.json", lambda p: lineage({"init": str(p.parent)})),
    "config.json": ("config.json", lambda p: GPT2Config.from_json(p)),
    "sharded index": ("model.safetensors.index.json", lambda p: read_index(p)),
    "TPP JSONL": ("train.jsonl", lambda p: load_examples(p)),
    "MIB graph JSON": ("graph.json", lambda p: from_mib_json(p)),
}

LENIENT = {"complete.json (checkpoint.damaged_files)", "non_finite.json"}


def nested(depth: int, kind: str) -> bytes:
    """A JSON value ``depth`` levels deep: [[[...]]] or {"a": {"a": ...}}."""
    if kind == "list":
        return b"[" * depth + b"]" * depth
    return b'{"a": ' * depth + b"1" + b"}" * depth


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                        max_size=3), max_leaves=8)
contents = st.one_of(
    st.builds(nested, st.integers(1, 100_000), st.sampled_from(["list", "dict"])),
    json_values.map(lambda v: json.dumps(v).encode()),
    json_values.map(lambda v: b"\xef\xbb\xbf" + json.dumps(v).encode()),  # a byte-order mark
    st.binary(max_size=64),
    st.just(b'{"a": 1, "a": 2}'),
)


def refused_or_read(reader, path: Path):
    try:
        reader(path)
    except (ValueError, FileNotFoundError) as e:
        message = str(e)
        assert path.name in message or str(path.parent) in message, message
        assert "Traceback" not in message and len(message) < 3000, message[:300]


@pytest.mark.parametrize("name", READERS)
@FUZZ
@given(data=contents)
def test_every_json_reader_names_the_file_whatever_it_holds(tmp_path_factory, name, data):
    file_name, reader = READERS[name]
    path = tmp_path_factory.mktemp("reader") / file_name
    path.write_bytes(data)
    refused_or_read(reader, path)


@pytest.mark.parametrize("name", READERS)
def test_100000_levels_and_an_oversized_file_are_named_errors(tmp_path, name):
    file_name, reader = READERS[name]
    path = tmp_path / file_name
    limit = {"MIB graph JSON": 1 << 31, "TPP JSONL": fileio.MAX_TEXT_BYTES}.get(name, fileio.MAX_JSON_BYTES)
    for data, problem in ((nested(100_000, "list"), "nested more than|not valid JSON|not a TPP example"),
                          (None, "bytes, more than the")):
        if data is None:
            with open(path, "wb") as f:
                f.truncate(limit + 1)  # sparse: costs no disk, and is refused before a byte is read
        else:
            path.write_bytes(data)
        if name in LENIENT:  # a damaged file reads as "none": the marker as unreadable, the note as absent
            assert reader(path) is None
            continue
        with pytest.raises(ValueError, match=problem):
            reader(path)


def test_a_log_line_nested_100000_levels_is_dropped_not_a_crash():
    assert _logged_step(nested(100_000, "list").decode()) == float("inf")
    assert _logged_step('{"step": 3}') == 3


# ------------------------------------------------------------------ a byte-order mark, one rule for every text input
BOM = b"\xef\xbb\xbf"


def _bom_cases(tmp_path: Path):
    import tpp
    from finetune.corpora import sources

    nouns = tmp_path / "nouns.txt"
    nouns.write_bytes(BOM + b"cat\ndog\nbird\nfish\n")
    templates = tmp_path / "templates.txt"
    templates.write_bytes(BOM + b"The {a} is a {b}. The {b} is a {c}. The {a} is a\n")
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(BOM + b"some text of a corpus.\n")
    jsonl = tmp_path / "train.jsonl"
    row = {"template": "t", "a": "x", "b": "y", "c": "z", "prompt": "p "}
    jsonl.write_bytes(BOM + json.dumps(row).encode() + b"\n")
    circuit = tmp_path / "circuit_m.json"
    circuit.write_bytes(BOM + json.dumps({"model": "m", "config": {"n_layer": 1, "n_head": 1},
                                          "ablated_heads": []}).encode())
    return [(nouns, lambda: tpp.load_nouns(nouns)), (templates, lambda: tpp.load_templates(str(templates))),
            (corpus, lambda: sources(str(corpus))), (jsonl, lambda: load_examples(jsonl)),
            (circuit, lambda: load_circuit(circuit))]


def test_a_byte_order_mark_is_refused_by_every_text_input(tmp_path):
    for path, read in _bom_cases(tmp_path):
        with pytest.raises(ValueError, match="byte-order mark") as e:
            read()
        assert path.name in str(e.value) and "Fix:" in str(e.value)


def test_tpp_build_with_a_bom_in_nouns_exits_2_on_one_line(tmp_path, capsys):
    from tpp.__main__ import main

    nouns = tmp_path / "nouns.txt"
    nouns.write_bytes(BOM + b"\n".join(w.encode() for w in ("cat", "dog", "bird", "fish", "cow", "ant")))
    assert main(["build", "--nouns", str(nouns), "--n", "20", "--out", str(tmp_path / "data")]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(errors) == 1 and "byte-order mark" in errors[0] and str(nouns) in errors[0], errors
    assert not (tmp_path / "data").exists()


# ------------------------------------------------------------------ what a weights path really holds
@pytest.fixture
def saved(tmp_path) -> Path:
    save_pretrained(make_model(CFG, seed=1), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _write_pickle(path: Path, protocol: int) -> None:
    if protocol < 0:
        torch.save({"a": torch.zeros(2)}, path)  # the zip format
    else:
        path.write_bytes(pickle.dumps({"a": [1.0, 2.0]}, protocol=protocol))


@pytest.mark.parametrize("what,make,says", [
    ("a torch.save zip named model.safetensors", lambda p: _write_pickle(p, -1), "is a pickle"),
    ("a protocol-0 pickle", lambda p: _write_pickle(p, 0), "is a pickle"),
    ("a protocol-1 pickle", lambda p: _write_pickle(p, 1), "is a pickle"),
    ("a protocol-2 pickle", lambda p: _write_pickle(p, 2), "is a pickle"),
    ("a Git LFS pointer", lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4c2e\n"
                                                 "size 548105171\n"), "Git LFS pointer.*git lfs pull"),
    ("a JSON file", lambda p: p.write_text(json.dumps(CFG.to_hf_dict())), "is a JSON file.*pass the directory"),
])
def test_a_file_that_is_not_safetensors_is_named_for_what_it_is(saved, what, make, says):
    make(saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=says) as e:
        load_pretrained(saved)
    assert "truncated or corrupt" not in str(e.value) and str(saved) in str(e.value)


def test_config_json_passed_as_the_weights_path_is_named(saved):
    with pytest.raises(CheckpointError, match=r"config.json is a JSON file.*pass the directory"):
        load_pretrained(saved / "config.json")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_neither_saved_nor_loaded(tmp_path, saved, value):
    model = make_model(CFG, seed=1)
    with torch.no_grad():
        model.blocks[1].mlp.c_fc.weight[3, 2] = value
    with pytest.raises(CheckpointError, match=r"NaN or inf.*transformer.h.1.mlp.c_fc.weight"):
        save_pretrained(model, tmp_path / "new")
    assert not (tmp_path / "new" / "model.safetensors").exists()
    # a file that holds one anyway (written by another tool) is refused on load, the tensor named
    from safetensors.torch import load_file, save_file
    sd = load_file(str(saved / "model.safetensors"))
    sd["transformer.wpe.weight"][0, 0] = value
    save_file(sd, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensors holding NaN or inf.*transformer.wpe.weight"):
        load_pretrained(saved)


def test_a_fifo_circuit_file_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "circuit_m.json"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"circuit_m.json: is not a regular file"):
        load_circuit(fifo)  # without blocking on the FIFO


def test_an_in_place_corruption_of_a_sealed_model_is_refused_on_load(tmp_path):
    """complete.json's sha256 catches a flipped byte that leaves the size as it was; a directory
    without complete.json (GPT-2's own files) loads as before."""
    d = ckpt.commit_dir(tmp_path, "model", lambda t: save_pretrained(make_model(CFG, seed=1), t))
    load_pretrained(d)
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-5] ^= 0x01  # a weight's low bit: the header stays valid
    (d / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors's sha256 differs.*complete.json"):
        load_pretrained(d)
    (d / "complete.json").unlink()
    load_pretrained(d)


# ------------------------------------------------------------------ writers under a full disk, or read-only
def enospc_at(monkeypatch, k: int) -> list[int]:
    """Make the k-th os.fsync (0-based) raise ENOSPC, as a full disk does when data reaches it;
    returns the call counter."""
    calls, real = [0], os.fsync

    def fsync(fd):
        calls[0] += 1
        if calls[0] - 1 == k:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def _count_fsyncs(monkeypatch, action) -> int:
    calls = enospc_at(monkeypatch, -1)
    action()
    monkeypatch.undo()
    return calls[0]


def test_a_full_disk_at_each_write_of_a_checkpoint_leaves_the_last_one_whole(tmp_path, monkeypatch):
    """ENOSPC at each fsync of a checkpoint's save: a named OSError, and after recovery (what --resume
    does first) the run holds step 2 whole, or step 4 whole; never a hidden leftover."""
    model = make_model(CFG, seed=2)
    opt = torch.optim.AdamW(model.parameters())
    state = lambda step: {"step": step, "tokens_seen": 0, "last_eval": {}, "last_eval_step": None}  # noqa: E731
    n = _count_fsyncs(monkeypatch, lambda: ckpt.save_checkpoint(tmp_path / "probe", model, opt, state(4), {}))
    assert n >= 6
    for k in range(n):
        out = tmp_path / f"run{k}"
        ckpt.save_checkpoint(out, model, opt, state(2), {"m": 1})
        before = listing(out)
        enospc_at(monkeypatch, k)
        try:
            ckpt.save_checkpoint(out, model, opt, state(4), {"m": 1})
            failed = False
        except OSError as e:
            failed = True
            assert e.errno == errno.ENOSPC and str(out) in str(e) and "No space left on device" in str(e), e
        monkeypatch.undo()
        ckpt.recover_run(out)
        after = listing(out)
        if failed:
            assert after == before, k
        assert not [p for p in after if "/." in "/" + p], after  # no hidden .tmp/.old/.del leftovers
        ckpt.load_checkpoint(ckpt.latest_checkpoint(out), model, opt)  # whole: sizes and checksums agree


def test_a_full_disk_while_safetensors_writes_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import minigpt2.weights as W

    def full(*a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(W, "save_file", full)
    with pytest.raises(OSError, match=r"cannot write .*model.safetensors: No space left on device. Fix: free"):
        save_pretrained(make_model(CFG, seed=1), tmp_path / "m")
    assert listing(tmp_path / "m") == []


@pytest.mark.parametrize("k", range(4))
def test_tpp_build_on_a_full_disk_names_the_file_and_leaves_nothing(tmp_path, monkeypatch, capsys, k):
    from tpp.__main__ import main

    enospc_at(monkeypatch, k)
    out = tmp_path / "data"
    assert main(["build", "--n", "30", "--eval-n", "5", "--single-n", "5", "--out", str(out)]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]  # progress lines aside
    assert len(errors) == 1 and "No space left on device" in errors[0] and str(out) in errors[0], errors
    assert not out.exists()


def test_an_existing_build_directory_keeps_its_files_on_a_full_disk(tmp_path, monkeypatch, capsys):
    from tpp.__main__ import main

    out = tmp_path / "data"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    enospc_at(monkeypatch, 1)
    assert main(["build", "--n", "30", "--eval-n", "5", "--single-n", "5", "--out", str(out)]) == 2
    assert listing(out) == ["mine.txt"]


@needs_read_only_place
def test_an_out_in_a_read_only_place_is_a_named_error(tmp_path):
    with pytest.raises(fileio.WriteError, match=r"cannot write /sys/minigpt2-test.*Fix: choose a place you can write"):
        with report.atomic_dir(READ_ONLY / "report") as tmp:
            (tmp / "x").write_text("never")


def test_report_write_json_on_a_full_disk_leaves_the_old_file(tmp_path, monkeypatch):
    path = report.write_json(tmp_path / "r.json", {"a": 1})
    enospc_at(monkeypatch, 0)
    with pytest.raises(fileio.WriteError, match="r.json: No space left on device"):
        report.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1} and listing(tmp_path) == ["r.json"]


# ------------------------------------------------------------------ directories
def test_report_and_run_directories_get_the_umasks_mode(tmp_path):
    old = os.umask(0o027)
    try:
        with report.atomic_dir(tmp_path / "report") as tmp:
            (tmp / "a.md").write_text("x")
        model = make_model(CFG, seed=1)
        opt = torch.optim.AdamW(model.parameters())
        path = ckpt.save_checkpoint(tmp_path / "run", model, opt, {"step": 1, "tokens_seen": 0, "last_eval": {},
                                                                  "last_eval_step": None}, {})
    finally:
        os.umask(old)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "report") == mode(path) == 0o750
    assert mode(tmp_path / "report" / "a.md") == 0o640


def test_partial_directories_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".report.partial-{int(dead.stdout)}-abcd"
    live = tmp_path / f".report.partial-{os.getpid()}-efgh"  # a writer still at work: kept
    other = tmp_path / ".other.partial-1-ijkl"  # another output's: not this writer's to judge
    for d in (stale, live, other):
        d.mkdir()
        (d / "half.md").write_text("x")
    with report.atomic_dir(tmp_path / "report") as tmp:
        (tmp / "a.md").write_text("x")
    assert not stale.exists() and live.exists() and other.exists()
    assert (tmp_path / "report" / "a.md").exists()


def test_an_interrupted_report_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with report.atomic_dir(tmp_path / "report") as tmp:
            (tmp / "a.md").write_text("x")
            raise KeyboardInterrupt
    assert listing(tmp_path) == []


@pytest.mark.parametrize("name", ["base", "featherweight", "lightweight", "welterweight"])
def test_the_bundled_models_carry_checksums_that_hold(name):
    """finetune.publish seals what it publishes; load_pretrained verifies the weights against it."""
    d = Path(__file__).resolve().parents[1] / "weights" / name
    marker = fileio.read_marker(d)
    assert marker is not None and {"model.safetensors", "config.json"} <= marker["sha256"].keys()
    assert fileio.checksum_problems(d, ["model.safetensors", "config.json"]) == []
