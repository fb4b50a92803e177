"""The CLI end to end on a tiny model folder, and every bad-input case: one-line error, exit 2, no output."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import SAMPLE_TEXT, ByteTokenizer, tiny_model

import actsparse as A
from actsparse.cli import main
from actsparse.io import atomic_output


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    if code:  # in-process, a library's logger may still hold an earlier test's stderr: take our last line
        err = err.strip().splitlines()[-1]
    return code, out, err


def last_json(out: str):
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(SAMPLE_TEXT)
    return p


def test_cli_end_to_end(capsys, tmp_path, model_dir, text_file):
    calib = tmp_path / "calib.safetensors"
    code, out, err = run_cli(capsys, "calibrate", "--model", model_dir, "--text", text_file, "--out", calib,
                             "--tokens", 1024, "--seq-len", 128, "--greedy-tokens", 256)
    assert code == 0, err
    assert last_json(out)["tokens"] == 1024 and calib.exists()

    th = tmp_path / "th.safetensors"
    code, out, err = run_cli(capsys, "sparsify", "--model", model_dir, "--calib", calib, "--sparsity", 0.5,
                             "--out", th, "--refine-tokens", 512)
    assert code == 0, err
    assert last_json(out)["sparsity"] == 0.5 and th.exists()

    res, png = tmp_path / "res.json", tmp_path / "q.png"
    code, out, err = run_cli(capsys, "eval", "--model", model_dir, "--text", text_file, "--calib", calib,
                             "--sparsity", "0.3,0.6", "--allocation", "uniform,greedy", "--thresholds", th,
                             "--context", 128, "--max-tokens", 512, "--refine-tokens", 512,
                             "--out", res, "--plot", png)
    assert code == 0, err
    summary = last_json(out)
    assert set(summary["configs"]) == {"magnitude-uniform@0.3", "magnitude-uniform@0.6", "magnitude-greedy@0.3",
                                       "magnitude-greedy@0.6", "th@0.5"}
    assert abs(summary["configs"]["th@0.5"]["sparsity"] - 0.5) < 0.05
    full = json.loads(res.read_text())
    assert full["dense"]["ppl"] == summary["dense"]["ppl"]
    assert png.stat().st_size > 10_000 and (tmp_path / "q_layers.png").stat().st_size > 10_000

    code, out, err = run_cli(capsys, "generate", "--model", model_dir, "--thresholds", th, "--prompt", "Anarchism is",
                             "--max-new-tokens", 8, "--device", "cpu")
    assert code == 0, err
    gen = last_json(out)
    assert gen["new_tokens"] == 8 and gen["tokens_per_s"] > 0
    assert not list(tmp_path.glob(".*.tmp"))


def test_unsupported_architecture(capsys, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(path)
    with pytest.raises(A.ActsparseError, match="unsupported architecture 'gpt2'.*llama.*mistral.*qwen2.*gemma2"):
        A.load_model(path)
    # a real process: stderr is exactly one line, exit status 2, nothing written
    proc = subprocess.run([sys.executable, "-m", "actsparse.cli", "calibrate", "--model", str(path), "--out",
                           str(tmp_path / "c.safetensors")], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: unsupported architecture 'gpt2'") and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "c.safetensors").exists()


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1])
def test_sparsity_out_of_range(capsys, tmp_path, bad):
    with pytest.raises(A.ActsparseError, match=r"sparsity must be in \[0, 1\)"):
        A.TealConfig(sparsity=bad)
    out = tmp_path / "t.safetensors"
    code, _, err = run_cli(capsys, "sparsify", "--calib", tmp_path / "whatever", "--sparsity", bad, "--out", out)
    assert code == 2 and "sparsity must be in [0, 1)" in err and not out.exists()


def test_missing_and_corrupt_calibration(capsys, tmp_path, model_dir):
    out = tmp_path / "t.safetensors"
    code, _, err = run_cli(capsys, "sparsify", "--model", model_dir, "--calib", tmp_path / "missing.safetensors",
                           "--sparsity", 0.5, "--out", out)
    assert code == 2 and "calibration file not found" in err and not out.exists()

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(300))
    code, _, err = run_cli(capsys, "sparsify", "--model", model_dir, "--calib", garbage, "--sparsity", 0.5, "--out", out)
    assert code == 2 and "corrupt" in err and not out.exists()

    # a real calibration file cut short
    model, tok = tiny_model("llama"), ByteTokenizer()
    good = tmp_path / "good.safetensors"
    A.calibrate(model, tok, SAMPLE_TEXT, A.CalibrationConfig(tokens=512, seq_len=128, greedy=False),
                progress=False).save(good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(A.ActsparseError, match="corrupt"):
        A.Calibration.load(cut)
    # a thresholds file is not a calibration file
    A.save_thresholds(tmp_path / "th.safetensors", {"a": torch.zeros(3)}, {})
    with pytest.raises(A.ActsparseError, match="not an actsparse calibration file"):
        A.Calibration.load(tmp_path / "th.safetensors")


def test_calibration_for_another_model(tmp_path):
    tok = ByteTokenizer()
    calib = A.calibrate(tiny_model("llama"), tok, SAMPLE_TEXT,
                        A.CalibrationConfig(tokens=512, seq_len=128, greedy=False), progress=False)
    with pytest.raises(A.ActsparseError, match="another model"):
        A.sparsify_(tiny_model("llama", hidden_size=48, head_dim=12), A.TealConfig(sparsity=0.5, allocation="uniform",
                                                                                   calibration=calib))
    with pytest.raises(A.ActsparseError, match="another model"):
        A.sparsify_(tiny_model("mistral"), A.TealConfig(sparsity=0.5, allocation="uniform", calibration=calib))
    with pytest.raises(A.ActsparseError, match="other weights"):
        A.sparsify_(tiny_model("llama", seed=1), A.TealConfig(sparsity=0.5, allocation="uniform", calibration=calib))
    # greedy was not computed: a clear message instead of a KeyError
    with pytest.raises(A.ActsparseError, match="no greedy allocation"):
        A.sparsify_(tiny_model("llama"), A.TealConfig(sparsity=0.5, allocation="greedy", calibration=calib))


def test_empty_and_short_text(capsys, tmp_path, model_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    out = tmp_path / "c.safetensors"
    code, _, err = run_cli(capsys, "calibrate", "--model", model_dir, "--text", empty, "--out", out)
    assert code == 2 and "is empty" in err and not out.exists()

    short = tmp_path / "short.txt"
    short.write_text("Just a few words.")
    code, _, err = run_cli(capsys, "calibrate", "--model", model_dir, "--text", short, "--out", out,
                           "--tokens", 1024, "--seq-len", 128)
    assert code == 2 and "too short" in err and not out.exists()

    code, _, err = run_cli(capsys, "eval", "--model", model_dir, "--text", short, "--context", 128)
    assert code == 2 and "too short" in err

    code, _, err = run_cli(capsys, "calibrate", "--model", model_dir, "--text", tmp_path / "nope.txt", "--out", out)
    assert code == 2 and "text file not found" in err


def test_unwritable_output_path(capsys, tmp_path, model_dir, text_file):
    for out in (tmp_path / "no" / "such" / "dir" / "c.safetensors", tmp_path):
        code, _, err = run_cli(capsys, "calibrate", "--model", model_dir, "--text", text_file, "--out", out,
                               "--tokens", 512, "--seq-len", 128)
        assert code == 2 and err.startswith("error: output")
    assert not (tmp_path / "no").exists()


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_missing_model_and_bad_gguf(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", "--model", tmp_path / "nothing-here")
    assert code == 2 and "model not found" in err
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(100))
    with pytest.raises(A.ActsparseError, match="cannot load GGUF"):
        A.load_model(bad)


def test_cli_relufy_trains(capsys, tmp_path, model_dir, text_file):
    out = tmp_path / "relu"
    args = ["relufy", "--model", model_dir, "--text", text_file, "--out", out, "--steps", 8, "--seq-len", 64,
            "--batch-tokens", 128, "--device", "cpu", "--checkpoint-every", 1, "--layerwise-steps", 0,
            "--sample-tokens", 0, "--hidden-distill", 0, "--fat-sparsity", 0.9, "--distill", 0.5]
    code, out_json, err = run_cli(capsys, *args)
    assert code == 0, err
    res = last_json(out_json)
    assert res["steps"] == 8 and res["fat_threshold"] > 0 and 0.5 < res["holdout_sparsity"] <= 1.0
    assert (out / "config.json").exists() and (out / "actsparse_relu.json").exists()
    meta = json.loads((out / "actsparse_relu.json").read_text())["metadata"]
    assert meta["train_config"]["fat_ramp"]["target"] == pytest.approx(0.92)  # default: --fat-sparsity + 0.02
    assert meta["train_config"]["l1"] is None
    # the relufied folder is a model like any other, FATReLU thresholds included
    code, out_json, err = run_cli(capsys, "generate", "--model", out, "--prompt", "hello", "--device", "cpu",
                                  "--max-new-tokens", 4)
    assert code == 0, err
    assert last_json(out_json)["new_tokens"] == 4
    code, _, err = run_cli(capsys, *args[:-4], "--steps", 0)
    assert code == 2 and "steps >= 1" in err
    code, _, err = run_cli(capsys, *args, "--fat-allocation", "by-hand")
    assert code == 2 and "allocation" in err


def test_cli_relufy_anneal(capsys, tmp_path, model_dir, text_file):
    out = tmp_path / "relu"
    args = ["relufy", "--model", model_dir, "--text", text_file, "--out", out, "--steps", 10, "--seq-len", 64,
            "--batch-tokens", 128, "--device", "cpu", "--sample-tokens", 0, "--hidden-distill", 0,
            "--fat-sparsity", 0.9, "--anneal", 0.3]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "--layerwise-steps 0" in err
    code, out_json, err = run_cli(capsys, *args, "--layerwise-steps", 0)
    assert code == 0, err
    assert last_json(out_json)["fat_threshold"] > 0
    cfg = json.loads((out / "actsparse_relu.json").read_text())["metadata"]["train_config"]
    assert cfg["relu_anneal"]["end"] == pytest.approx(0.3) and cfg["fat_ramp"]["start"] == pytest.approx(0.3)
    code, _, err = run_cli(capsys, *args[:-1], "0.8", "--layerwise-steps", 0, "--out", tmp_path / "r2")
    assert code == 2 and "--anneal must be" in err


def test_cli_relufy_layerwise_and_hidden_distill(capsys, tmp_path, model_dir, text_file):
    out = tmp_path / "relu"
    args = ["relufy", "--model", model_dir, "--text", text_file, "--out", out, "--steps", 3, "--seq-len", 64,
            "--batch-tokens", 128, "--device", "cpu", "--fat-tol", 0.05, "--layerwise-steps", 4, "--l1-peak", 0,
            "--hidden-distill", 0.5, "--sample-tokens", 256]
    code, out_json, err = run_cli(capsys, *args)
    assert code == 0, err
    res = last_json(out_json)
    assert res["steps"] == 3 and res["layerwise_rel_error"] > 0
    assert (out / "checkpoints" / "layerwise.pt").exists()
    meta = json.loads((out / "actsparse_relu.json").read_text())["metadata"]
    assert meta["layerwise_config"]["steps"] == 4 and meta["train_config"]["hidden_distill"] == 0.5
    assert meta["sample_config"]["tokens"] == 256
    assert meta["train_config"]["fat_ramp"] is None  # --fat-tol: no ramp unless asked for
    samples = torch.load(out / "checkpoints" / "samples.pt")
    assert samples.shape == (4, 64)  # 256 sampled tokens as 64-token windows
