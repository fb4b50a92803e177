"""Fused decode attention (kernels/decode_attention.py) against the engine's plain path, per layer.

Batch 1 (and 4), Llama-3-8B heads (32 query heads, 8 kv heads, head_dim 128), bf16, a KV cache of
384 positions (the engine benchmark's 128-token prompt + 256 new tokens) and of 4096, at several
positions. "plain" is what the engine ran before: RoPE of q and k, the two cache writes, q.K^T,
softmax and P.V (`_decode_attention_matmul`), eager, and "plain_compiled" the same through
torch.compile (as the engine compiles it). "fused" is the one Triton launch. Both are timed back to back in CUDA graphs on per-layer copies of the cache (32 layers, so
the caches do not stay in L2), after a correctness check of the fused kernel against the reference
on the same inputs. JSON last line.

    PYTHONPATH=. python benchmarks/bench_decode_attention.py --out decode_attention.json
"""

from __future__ import annotations

import argparse
import sys

import torch

from actsparse.engine.model import _decode_attention_matmul, apply_rope
from actsparse.kernels.decode_attention import decode_attention, decode_attention_reference
from benchmarks.common import env_header, graph_time_us, print_json_last, save_json

H, HKV, D, LAYERS = 32, 8, 128, 32


def make_layers(B, S, pos, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    layers = []
    for _ in range(LAYERS):
        layers.append({
            "qkv": torch.randn(B, (H + 2 * HKV) * D, device="cuda", generator=gen).bfloat16(),
            "k": torch.randn(B, HKV, S, D, device="cuda", generator=gen).bfloat16(),
            "v": torch.randn(B, HKV, S, D, device="cuda", generator=gen).bfloat16(),
            "counts": torch.zeros(B * HKV, dtype=torch.int32, device="cuda"),
        })
    emb = torch.rand(D // 2, device="cuda", generator=gen).repeat(2) * 6
    p = torch.arange(S, device="cuda")
    return layers, emb.cos()[None], emb.sin()[None], (p <= pos)[None], torch.tensor([pos], device="cuda")


def plain(layer, cos, sin, mask, input_pos, B):
    """The engine's pre-fused path for one layer (Attention.forward with decode_attention="matmul")."""
    q, k, v = layer["qkv"].view(B, 1, -1).split([H * D, HKV * D, HKV * D], dim=-1)
    q = apply_rope(q.view(B, 1, H, D).transpose(1, 2), cos, sin)
    k = apply_rope(k.view(B, 1, HKV, D).transpose(1, 2), cos, sin)
    v = v.view(B, 1, HKV, D).transpose(1, 2)
    layer["k"].index_copy_(2, input_pos, k)
    layer["v"].index_copy_(2, input_pos, v)
    y = _decode_attention_matmul(q.reshape(B, HKV, H // HKV, D), layer["k"], layer["v"], mask)
    return y.reshape(B, H * D)


# the plain path as the engine ran it: Inductor-compiled glue (one compile serves every layer)
plain_compiled = torch.compile(plain, dynamic=False)


def fused(layer, cos, sin, mask, input_pos, B):
    return decode_attention(layer["qkv"], cos, sin, mask, input_pos, layer["k"], layer["v"], H, HKV, D,
                            counts=layer["counts"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", action="store_true",
                    help="time the fused kernel only, for every BLOCK_S x NUM_WARPS launch shape (B=1)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode_attention needs a CUDA GPU", file=sys.stderr)
        return 2
    doc = {"benchmark": "decode_attention", **env_header(), "command": "python " + " ".join(sys.argv),
           "heads": {"n_head": H, "n_kv_head": HKV, "head_dim": D}, "rows": [], "gate_failed": []}
    if args.sweep:
        return sweep(doc, args.out)
    for B, S, positions in ((1, 384, (127, 255, 383)), (4, 384, (255,)), (1, 4096, (1023, 4095))):
        for pos in positions:
            layers, cos, sin, mask, input_pos = make_layers(B, S, pos, seed=pos + B)
            l0 = layers[0]
            k_ref, v_ref = l0["k"].clone(), l0["v"].clone()
            ref = decode_attention_reference(l0["qkv"], cos, sin, mask, input_pos, k_ref, v_ref, H, HKV, D)
            errs = {}
            for name, fn in (("fused", fused), ("plain", plain)):
                out = fn({**l0, "k": l0["k"].clone(), "v": l0["v"].clone()}, cos, sin, mask, input_pos, B)
                errs[name] = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
            if not errs["fused"] < 2e-2:
                doc["gate_failed"].append({"B": B, "S": S, "pos": pos, **errs})
                continue
            forms = (("fused", fused), ("plain", plain), ("plain_compiled", plain_compiled))
            us = {name: graph_time_us([lambda layer=layer, fn=fn: fn(layer, cos, sin, mask, input_pos, B)
                                       for layer in layers]) for name, fn in forms}
            row = {"B": B, "S": S, "pos": pos, "rel_err": errs, "us_per_layer": {k: round(v, 2) for k, v in us.items()},
                   "speedup": round(us["plain"] / us["fused"], 3),
                   "speedup_vs_compiled": round(us["plain_compiled"] / us["fused"], 3),
                   "kv_bytes_read": 2 * B * HKV * (pos + 1) * D * 2}
            row["fused_TBps"] = round(row["kv_bytes_read"] / us["fused"] / 1e6, 3)
            doc["rows"].append(row)
            print(f"B={B} S={S} pos={pos}: plain {us['plain']:6.2f} us  compiled {us['plain_compiled']:6.2f} us  "
                  f"fused {us['fused']:6.2f} us "
                  f"(x{row['speedup']:.2f}, {row['fused_TBps']:.2f} TB/s of cache)  err {errs}", flush=True)
            del layers
    if args.out:
        save_json(doc, args.out)
    print_json_last({k: doc[k] for k in ("benchmark", "date", "commit", "gate_failed")} | {
        "rows": [[r["B"], r["S"], r["pos"], r["us_per_layer"]["plain"], r["us_per_layer"]["plain_compiled"],
                  r["us_per_layer"]["fused"], r["speedup_vs_compiled"]]
                 for r in doc["rows"]]})
    return 1 if doc["gate_failed"] else 0


def sweep(doc: dict, out) -> int:
    """The fused kernel's launch shape: positions per program (BLOCK_S) and warps per program, each
    gated against the reference on the same inputs, then timed like the main table."""
    import actsparse.kernels.decode_attention as da

    default = (da.BLOCK_S, da.NUM_WARPS)
    doc["sweep"] = []
    try:
        for S, pos in ((384, 127), (384, 383), (4096, 1023), (4096, 4095)):
            layers, cos, sin, mask, input_pos = make_layers(1, S, pos, seed=pos)
            l0 = layers[0]
            ref = decode_attention_reference(l0["qkv"], cos, sin, mask, input_pos, l0["k"].clone(), l0["v"].clone(),
                                             H, HKV, D)
            row = {"S": S, "pos": pos, "us": {}, "default": f"{da.block_s_for(S) if default[0] is None else default[0]}"
                                                               f"x{default[1]}"}
            row["plain_compiled_us"] = round(graph_time_us(
                [lambda layer=layer: plain_compiled(layer, cos, sin, mask, input_pos, 1) for layer in layers]), 2)
            for block_s in (16, 32, 64, 128, 256):
                for warps in (2, 4, 8):
                    da.BLOCK_S, da.NUM_WARPS = block_s, warps
                    key = f"{block_s}x{warps}"
                    out_ = fused({**l0, "k": l0["k"].clone(), "v": l0["v"].clone()}, cos, sin, mask, input_pos, 1)
                    err = ((out_.double() - ref.double()).norm() / ref.double().norm()).item()
                    if not err < 2e-2:
                        doc["gate_failed"].append({"S": S, "pos": pos, "launch": key, "rel_err": err})
                        continue
                    row["us"][key] = round(graph_time_us([lambda layer=layer: fused(layer, cos, sin, mask, input_pos, 1)
                                                          for layer in layers]), 2)
            best = min(row["us"], key=row["us"].get)
            row["best"] = best
            doc["sweep"].append(row)
            print(f"S={S} pos={pos}: compiled plain {row['plain_compiled_us']} us; default {row['default']} "
                  f"{row['us'].get(row['default'])} us, best {best} {row['us'][best]} us; all {row['us']}", flush=True)
            del layers
    finally:
        da.BLOCK_S, da.NUM_WARPS = default
    if out:
        save_json(doc, out)
    print_json_last({k: doc[k] for k in ("benchmark", "date", "commit", "gate_failed")} | {
        "sweep": [[r["S"], r["pos"], r["default"], r["us"].get(r["default"]), r["best"], r["us"][r["best"]]]
                  for r in doc["sweep"]]})
    return 1 if doc["gate_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
