"""The engine benchmark's harness on the CPU (tiny model, interpreter kernels): every variant it
times must run, pass its gates and land in the JSON. Speed is not checked here (benchmarks/)."""

import json

import pytest

pytestmark = pytest.mark.interpreter


def test_bench_engine_variants_run_and_are_gated(tmp_path):
    from benchmarks.bench_engine import main

    out = tmp_path / "engine.json"
    main(["--shape", "tiny-llama", "--device", "cpu", "--sparsities", "0,0.5", "--batches", "1",
          "--repeats", "1", "--skip-hf", "--new-tokens", "6", "--prompt-len", "12", "--calib-tokens", "48",
          "--attention", "matmul", "--act-boundary", "on", "--compare-fused-prologue", "--pdl", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["errors"] == [] and doc["gates_passed"], (doc["errors"], doc["gates"])
    assert set(doc["sparse_by_s"]) == {"0.0", "0.5"}
    # the option and PDL variants: their own rates at the levels they time, and their own gates
    for name, levels in (("fused_prologue", {"0.0", "0.5"}), ("nopdl", {"0.5"})):
        assert set(doc[f"sparse_{name}_by_s"]) == levels, name
        assert all(v["tok_s"] > 0 for v in doc[f"sparse_{name}_by_s"].values())
        assert any(g.endswith("_" + name) for g in doc["gates"]), name
    # the sparse path skipped about half the rows at s=0.5 and none at s=0
    assert doc["sparse_by_s"]["0.0"]["achieved"]["rows_skipped"] == 0.0
    assert 0.3 < doc["sparse_by_s"]["0.5"]["achieved"]["rows_skipped"] < 0.7


def test_bench_relu_train_harness_gates_modes_against_plain(tmp_path):
    """bench_relu_train on the CPU: every mode trains, the first-step gate compares each with the
    plain loss, and compiled layers come back uncompiled (a rate is only reported when the gates
    pass)."""
    from benchmarks.bench_relu_train import main

    out = tmp_path / "relu_train.json"
    assert main(["--tiny", "--steps", "3", "--warmup", "1", "--batch-size", "2", "--micro-batch-size", "2",
                 "--context", "32", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["gates_passed"] and doc["errors"] == []
    assert set(doc["gates"]) == {f"{m}_layers_handed_back_uncompiled" for m in ("plain", "chunked", "compiled")} | {
        f"{m}_first_step_{g}" for m in ("chunked", "compiled") for g in ("loss", "sparsity")}
    for mode in ("chunked", "compiled"):  # fp32 on the CPU: rounding only
        assert doc["first_step"][mode]["loss_rel_diff"] < 1e-3
    assert doc["plain"]["tokens_per_s"] > 0 and set(doc["speedup_vs_plain"]) == {"chunked", "compiled"}
    with pytest.raises(SystemExit):
        main(["--tiny", "--modes", "chunked,plain"])


def test_relu_smollm2_no_probe_runs_the_fine_tune(tmp_path):
    """relu_smollm2 --no-probe (a fixed --max-steps, no throughput probe) in a single call without
    --e2e-checkpoint: the ReLU fine-tune and its FATReLU stages run instead of being skipped for an
    unknown (NaN) time estimate."""
    from benchmarks.relu_smollm2 import main

    out = tmp_path / "r"
    main(["--tiny", "--no-probe", "--no-resume-check", "--max-steps", "6", "--peaks", "", "--skip-control",
          "--relu-distill-alpha", "1", "--distill-alpha", "0", "--fat-target", "0.85", "--context", "32",
          "--batch-size", "2", "--micro-batch-size", "2", "--eval-tokens", "256", "--out", str(out)])
    doc = json.loads((out / "relu_smollm2.json").read_text())
    assert doc["skipped"] == []
    relu = [name for name in doc["stages"] if name.startswith("relu_finetune")]
    assert len(relu) >= 2 and any(name.endswith("+fat") for name in relu), relu
