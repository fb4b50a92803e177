"""Real-weights check of the ReLU decode path: SmolLM2-135M relufied (no training) and generated from.

The MLP activation becomes FATReLU with a per-layer threshold at the s-quantile of that layer's
gate values on wiki_calib (so about s of h is exactly zero), the model is saved as a relufied
folder (`save_relufied`, as `actsparse relufy` writes it), and the engine generates from the folder
twice: plain, and with ProSparse's steps 2 + 3 (`generate(..., relu_kernels=True)`, which calls
`Transformer.sparsify_relu_`). Both compute the same function. The check, on every layer's real
MLP input (one row as in decode, and the prompt's rows): step 2's h against the fp32 reference,
leaving out neurons whose gate lies within 1e-3 of the FATReLU threshold (there either answer is
right, and in bf16 the plain path's rounded gate flips a few of them), and step 3 against the
reference on that h. The plain-vs-steps MLP output difference is reported. Whole-model logits
and texts are reported, not checked: this untrained relufied model is
chaotic (massive activations; one FATReLU flip at a gate equal to T from a different summation
order grows from 1e-6 to tens of % over the layers), so they can differ. No training, so the text
itself is poor: this checks the path, not quality. The speed of a 135M model is launch-bound and
says little about large models; it is reported for completeness.

    PYTHONPATH=. python benchmarks/relu_generate_smollm2.py --model SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/relu-smol
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import actsparse as A
from actsparse.engine import Generator, generate, load_hf
from actsparse.kernels.sparse_gemv import sparse_gemv_reference
from actsparse.relu import ReluConfig, activation_modules, relufy_, save_relufied
from benchmarks.bench_engine_relu import gate_up_err


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@torch.no_grad()
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", required=True, help="folder for the relufied model")
    p.add_argument("--sparsity", type=float, default=0.85)
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--check-backend", default=None, choices=("torch", "triton"),
                   help="backend of the per-layer check (default: what generate chose; 'triton' with "
                        "TRITON_INTERPRET=1 checks the kernels on the CPU)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)

    hf, tok = A.load_model(args.model, device=args.device)
    ids = tok(A.read_text("wiki_calib"), return_tensors="pt")["input_ids"][:, : args.calib_tokens].to(args.device)
    relufy_(hf, ReluConfig())
    gates = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: gates.__setitem__(n, a[0].detach()))
             for n, m in activation_modules(hf).items()]
    hf(ids)
    for h in hooks:
        h.remove()
    thresholds = {n: max(torch.quantile(g.float().flatten()[: 1 << 24], args.sparsity).item(), 0.0)
                  for n, g in gates.items()}
    relufy_(hf, ReluConfig(layer_thresholds=thresholds))
    save_relufied(hf, tok, args.out)

    prompt = "The history of the city begins"
    result = {"model": str(args.model), "sparsity_target": args.sparsity, "dtype": args.dtype,
              "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "commit": os.environ.get("ACTSPARSE_COMMIT", "unknown")}
    engines, runs = {}, {}
    for relu_kernels in (False, True):
        engine = load_hf(args.out, device=args.device, dtype=dtype)
        text, stats = generate(engine, tok, prompt, args.new_tokens, device=args.device, dtype=dtype,
                               relu_kernels=relu_kernels)
        runs["steps_2_3" if relu_kernels else "plain"] = {"text": text, "tok_s": stats["tokens_per_s"],
                                                          "backend": stats["backend"]}
        engines[relu_kernels] = engine
    # same function: eager prefill + one decode step of both engines on the same tokens
    p_ids = tok(prompt, return_tensors="pt")["input_ids"].to(args.device)
    logits = {}
    for k, engine in engines.items():
        engine.setup_caches(1, 128)
        T = p_ids.shape[1]
        engine(p_ids, torch.arange(T, device=args.device))
        logits[k] = engine(p_ids[:, -1:], torch.tensor([T], device=args.device))[:, -1].float()
    inputs = Generator(engines[False], 1, 128, compile=False, cuda_graph=False)._record_inputs(p_ids)
    n_layers = len(engines[False].layers)
    zeros = [(inputs[f"layers.{i}.feed_forward.w2"] == 0).float().mean().item() for i in range(n_layers)]
    F_ = engines[True].args.intermediate_size
    step2_errs, step3_errs, mlp_errs = [], [], []
    for i in range(n_layers):
        x = inputs[f"layers.{i}.feed_forward.w13"]  # [1, T, dim]: the layer's MLP input
        ff = engines[True].layers[i].feed_forward
        if args.check_backend:
            ff.gate_up_backend = ff.w2.backend = args.check_backend
        for rows in (x[:, -1:], x[:, :8]):  # a decode step; up to 8 prompt rows (the kernels' batch)
            x2 = rows.reshape(-1, rows.shape[-1])
            h = ff._sparse_gate_up(rows).reshape(-1, F_)
            step2_errs.append(gate_up_err(ff, x2, h, F_))
            step3_errs.append(rel_err(ff.w2(h[None])[0], sparse_gemv_reference(h, ff.w2.weight_t, ff.w2.thresholds)))
            mlp_errs.append(rel_err(ff(rows), engines[False].layers[i].feed_forward(rows)))
    limit = 1e-5 if dtype == torch.float32 else 1e-2
    worst = max(step2_errs + step3_errs)
    result.update(runs=runs, step2_max_rel_err=max(step2_errs), step3_max_rel_err=max(step3_errs), limit=limit,
                  check_passed=bool(worst <= limit), info_mlp_vs_plain_max_rel_err=max(mlp_errs),
                  info_same_text=runs["plain"]["text"] == runs["steps_2_3"]["text"],
                  info_decode_logits_rel_err=rel_err(logits[True], logits[False]),
                  h_zero_fraction=sum(zeros) / len(zeros),
                  speedup=runs["steps_2_3"]["tok_s"] / runs["plain"]["tok_s"])
    doc = json.dumps(result)
    if args.json:
        with open(args.json, "w") as f:
            f.write(doc + "\n")
    print(doc)
    return result


if __name__ == "__main__":
    main()
