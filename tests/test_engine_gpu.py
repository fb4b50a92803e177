"""The engine on a GPU (skipped without CUDA): sparse Triton linears inside every decode mode
(eager, compiled blocks, CUDA graph, both) against the eager pure-PyTorch reference with the same
thresholds, on a random bf16 model large enough to use split-K and every kernel path.

Run on a GPU with ``TRITON_INTERPRET=0 python -m pytest tests/test_engine_gpu.py -q -s`` (the
test conftest turns the Triton interpreter on unless told otherwise; -s prints each error).
"""

import os

import pytest
import torch

from actsparse.engine import Generator, ModelArgs, random_model

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU and compiled Triton kernels (TRITON_INTERPRET=0)",
)

ARGS = dict(vocab_size=4096, dim=1024, n_layer=4, n_head=16, n_kv_head=4, intermediate_size=2816)
T = 48


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@torch.no_grad()
def eager_step_logits(model, prompt):
    """First decode step after an eager prefill, no compile, no graph: [B, V] fp32."""
    model.setup_caches(prompt.shape[0], 128)
    first = model(prompt, torch.arange(T, device="cuda"), last_only=True)[:, -1].argmax(-1)
    return model(first[:, None], torch.tensor([T], device="cuda"))[:, -1].float()


@torch.no_grad()
def generator_step_logits(model, prompt, compile, cuda_graph):
    gen = Generator(model, batch_size=prompt.shape[0], max_seq_len=128, compile=compile,
                    cuda_graph=cuda_graph, gemv="cublas", keep_logits=True)
    gen.generate(prompt, 2)
    return gen.logits.float().clone()


@pytest.fixture(scope="module")
def sparse_model():
    model = random_model(ModelArgs(**ARGS), device="cuda", dtype=torch.bfloat16, seed=0, std=0.05)
    calib = torch.randint(0, ARGS["vocab_size"], (1, 96), device="cuda")
    gen = Generator(model, batch_size=1, max_seq_len=128, compile=False, cuda_graph=False)
    thresholds = gen.calibrate(calib, [0.5])[0.5]
    model.sparsify_(thresholds, backend="triton")
    return model.set_max_gemv_rows_(8)  # batch 3 through the kernels too (the default sends it to a matmul)


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_sparse_decode_matches_reference(sparse_model, B, cuda_graph):
    """Eager glue, with and without a CUDA graph: every Triton linear call of the decode step
    equals the reference on the input it received (with a graph, the calls recorded while
    capturing hold what the replay computed).

    Whole-step logits against the reference backend are printed, not asserted: split-K partial
    sums land in a varying order, and the thresholds turn the resulting 1-ulp differences into
    kept/dropped flips that grow layer by layer (this random model: 0 to 0.26 between runs)."""
    from actsparse.kernels.sparse_gemv import sparse_gemv_reference

    model = sparse_model
    prompt = torch.randint(0, ARGS["vocab_size"], (B, T), device="cuda",
                           generator=torch.Generator(device="cuda").manual_seed(B))
    step = (lambda: eager_step_logits(model, prompt)) if not cuda_graph else (
        lambda: generator_step_logits(model, prompt, compile=False, cuda_graph=True))
    linears = [lin for _, lin, _ in model.block_linears()]
    for lin in linears:
        lin.record_io = []
    try:
        ours = step()
        torch.cuda.synchronize()
        calls = [(lin, x, y) for lin in linears for x, y in lin.record_io if x.shape[0] == B]
        worst = max(rel_err(y, sparse_gemv_reference(x, lin.weight_t, lin.thresholds)) for lin, x, y in calls)
    finally:
        for lin in linears:
            lin.record_io = None
    model.set_backend_("torch")
    ref = step()
    model.set_backend_("triton")
    print(f"B={B} graph={cuda_graph}: {len(calls)} linear calls, worst rel err {worst:.2e}; "
          f"step logits vs reference backend {rel_err(ours, ref):.2e} (not a kernel error)")
    assert len(calls) >= len(linears)
    assert worst < 1e-2, (B, cuda_graph, worst)


@pytest.mark.parametrize("B", [1, 3])
def test_sparse_linears_inside_compiled_decode(sparse_model, B):
    """Compiled glue: every sparse linear's output equals the reference on the input it received.

    Whole-step logits are not compared here: Inductor's fused glue rounds bf16 differently from
    eager glue, and the thresholds turn those 1-ulp differences into kept/dropped flips that grow
    layer by layer, so two correct runs disagree by far more than any kernel error (printed)."""
    from actsparse.kernels.sparse_gemv import sparse_gemv_reference

    model = sparse_model
    prompt = torch.randint(0, ARGS["vocab_size"], (B, T), device="cuda",
                           generator=torch.Generator(device="cuda").manual_seed(10 + B))
    linears = [lin for _, lin, _ in model.block_linears()]
    for lin in linears:
        lin.record_io = []
    try:
        ours = generator_step_logits(model, prompt, compile=True, cuda_graph=False)
        calls = [(lin, x, y) for lin in linears for x, y in lin.record_io if x.shape[0] == B]
    finally:
        for lin in linears:
            lin.record_io = None
    assert len(calls) >= len(linears)  # every linear ran at least one decode step
    worst = max(rel_err(y, sparse_gemv_reference(x, lin.weight_t, lin.thresholds)) for lin, x, y in calls)
    model.set_backend_("torch")
    ref_eager_glue = eager_step_logits(model, prompt)
    model.set_backend_("triton")
    print(f"B={B}: {len(calls)} compiled-decode linear calls, worst rel err {worst:.2e}; "
          f"logits vs eager glue {rel_err(ours, ref_eager_glue):.2e} (not a kernel error)")
    assert worst < 1e-2


@pytest.mark.parametrize("case", [(1, 32, 8, 128, 384, 200, None), (3, 9, 3, 48, 200, 150, 40), (2, 14, 2, 64, 130, 0, None)],
                         ids=["llama3-8b-heads", "odd-window", "first-position"])
def test_decode_attention_kernels_native(case):
    """The fused decode-attention kernels compiled for the GPU against the reference, bf16."""
    from actsparse.kernels.decode_attention import decode_attention, decode_attention_reference

    B, H, Hkv, D, S, pos, window = case
    gen = torch.Generator(device="cuda").manual_seed(pos + H)
    qkv = torch.randn(B, (H + 2 * Hkv) * D, device="cuda", generator=gen).bfloat16()
    k_cache = torch.randn(B, Hkv, S, D, device="cuda", generator=gen).bfloat16()
    v_cache = torch.randn(B, Hkv, S, D, device="cuda", generator=gen).bfloat16()
    emb = torch.rand(D // 2, device="cuda", generator=gen).repeat(2) * 6
    cos, sin = emb.cos()[None], emb.sin()[None]
    p = torch.arange(S, device="cuda")
    mask = (p <= pos) & (p > pos - window if window else True)
    args = (qkv, cos, sin, mask[None], torch.tensor([pos], device="cuda"))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    ref = decode_attention_reference(*args, k_ref, v_ref, H, Hkv, D)
    counts = torch.zeros(B * Hkv, dtype=torch.int32, device="cuda")
    out = decode_attention(*args, k_cache, v_cache, H, Hkv, D, counts=counts)
    assert not counts.any()  # the last block of each head re-zeroed its counter
    for _ in range(3):  # again with the same counters (the cache row at pos now holds the same key)
        assert torch.equal(decode_attention(*args, k_cache, v_cache, H, Hkv, D, counts=counts), out)
    err = rel_err(out, ref)
    print(f"decode_attention {case}: rel err {err:.2e}")
    assert err < 2e-2
    assert torch.equal(v_cache, v_ref)
    assert rel_err(k_cache, k_ref) < 1e-2
    from actsparse.kernels.sparse_gemv import pdl_default, set_pdl_default

    default = pdl_default()
    set_pdl_default(not default)  # the same kernel with programmatic dependent launch switched over
    try:
        assert torch.equal(decode_attention(*args, k_cache, v_cache, H, Hkv, D, counts=counts), out)
        assert not counts.any()
    finally:
        set_pdl_default(default)


@pytest.mark.parametrize("B", [1, 4])
def test_kept_list_native_compiled_and_graphed(B):
    """ProSparse steps 2 -> 3 through the kept list with compiled Triton kernels: eager, inside
    torch.compile(fullgraph=True) (the custom ops), and replayed from a CUDA graph five times (the
    list's count must be zero after every step 3, or the next step 2 would append to a stale list)."""
    from actsparse.kernels.sparse_mlp import kept_list, sparse_down_kept_, sparse_gate_up

    g = torch.Generator(device="cuda").manual_seed(B)
    K, F, N = 1000, 2900, 1000  # odd sizes
    x = torch.randn(B, K, device="cuda", generator=g).bfloat16()
    wg = (torch.randn(F, K, device="cuda", generator=g) / K**0.5).bfloat16()
    wu = (torch.randn(F, K, device="cuda", generator=g) / K**0.5).bfloat16()
    wd_t = (torch.randn(F, N, device="cuda", generator=g) / F**0.5).bfloat16()
    thr = torch.full((F,), 0.6, device="cuda")  # about 85% of ReLU(gate) below it
    kept = kept_list(B, F, torch.bfloat16, "cuda")

    def mlp(x, out):
        h = sparse_gate_up(x, wg, wu, thr, "relu", kept=kept)
        sparse_down_kept_(out, kept, wd_t)
        return h

    out = torch.zeros(B, N, device="cuda")
    h = mlp(x, out)
    exact = h.double() @ wd_t.double()
    assert (h == 0).float().mean().item() > 0.7
    assert rel_err(out, exact) < 1e-4 and kept.count.tolist() == [0, 0]
    compiled = torch.compile(mlp, fullgraph=True)
    out.zero_()
    compiled(x, out)
    assert rel_err(out, exact) < 1e-4 and kept.count.tolist() == [0, 0]
    out.zero_()
    mlp(x, out)  # warm-up on the side stream is not needed: kernels and buffers exist already
    graph = torch.cuda.CUDAGraph()
    out.zero_()
    with torch.cuda.graph(graph):
        mlp(x, out)
    out.zero_()
    for i in range(5):
        graph.replay()
        torch.cuda.synchronize()
        assert kept.count.tolist() == [0, 0]
        assert rel_err(out, (i + 1) * exact) < 1e-4


@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("pre", ["rmsnorm", "silu"])
def test_input_prologues_native(pre, B):
    """sparse_gemv's input prologues compiled for the GPU, bf16 (rounded to nearest there, as
    PyTorch rounds): the fused RMSNorm / silu(gate) * up against the masked product of
    apply_input_prologue, eager, inside torch.compile(fullgraph=True) and from a CUDA graph.
    Thresholds sit at the column median of the prologue's output (about half the rows kept)."""
    from actsparse.kernels.sparse_gemv import apply_input_prologue, sparse_gemv, sparse_gemv_add_

    g = torch.Generator(device="cuda").manual_seed(B)
    K, N = 4000, 3001  # odd sizes, several K splits
    w_t = (torch.randn(K, N, device="cuda", generator=g) / K**0.5).bfloat16()
    if pre == "rmsnorm":
        x = torch.randn(B, K, device="cuda", generator=g) * 3
        kw = dict(norm_weight=(0.5 + torch.rand(K, device="cuda", generator=g)).bfloat16(), eps=1e-5)
    else:
        x = (torch.randn(B, 2 * K, device="cuda", generator=g) * 2).bfloat16()
        kw = dict(act="silu")
    xin = apply_input_prologue(x, torch.bfloat16, **kw).float()
    thr = xin.abs().median(dim=0).values.contiguous() if B > 1 else torch.full((K,), xin.abs().median().item(), device="cuda")
    exact = torch.where(xin.abs() > thr, xin, 0.0).double() @ w_t.double()
    assert rel_err(sparse_gemv(x, w_t, thr, **kw), exact) < 5e-3
    out = torch.zeros(B, N, device="cuda")
    assert rel_err(sparse_gemv_add_(out, x, w_t, thr, **kw), exact) < 1e-4
    compiled = torch.compile(lambda x: sparse_gemv(x, w_t, thr, **kw), fullgraph=True)
    assert rel_err(compiled(x), exact) < 5e-3
    out.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sparse_gemv_add_(out, x, w_t, thr, **kw)
    out.zero_()
    for i in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, 3 * exact) < 1e-4
