"""Memory of a larger transformer's frozen base weights: float32 vs NF4 vs NF4 + double quantization.

The story:

1. Build a decoder-only transformer from standard Keras layers (Embedding,
   MultiHeadAttention, LayerNormalization, Dense), by default 6 blocks of width
   512 (about 23 million parameters), initialised like GPT-2 (normal, std 0.02).
   Its weights are random: storage does not depend on training.
2. Adapt it twice with QLoRA, once storing the base kernels as NF4 with float32
   group scales and once with double quantization (the scales themselves in 8
   bits), LoRA rank 8 on every attention and feed-forward projection.
3. Print, per adapted layer, the bytes of its base kernel as float32, as NF4 and
   as NF4 + DQ, counted from the variables the layers really hold
   (`tf_lora.memory_report`) and cross-checked with `tf_lora.nf4.bits_per_parameter`,
   plus totals, the LoRA adapters' bytes and the relative quantization error of
   the kernels (double quantization of the scales costs almost nothing in accuracy).

Run ``python examples/memory_report.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.get_logger().setLevel("ERROR")

import tf_lora  # noqa: E402
from tf_lora import nf4  # noqa: E402
from example_utils import PositionEmbedding, positive  # noqa: E402


# ----------------------------------------------------------------- model ---
def transformer(args) -> keras.Model:
    """A GPT-style decoder: pre-norm blocks of causal attention and a GELU MLP."""
    init = keras.initializers.RandomNormal(stddev=0.02)
    tokens = keras.Input((args.seq_len,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(args.vocab, args.dim, embeddings_initializer=init, name="embedding")(tokens)
    x = PositionEmbedding(args.seq_len, name="position")(x)
    for i in range(args.layers):
        h = keras.layers.LayerNormalization(name=f"block_{i}_norm_1")(x)
        h = keras.layers.MultiHeadAttention(args.heads, args.dim // args.heads, kernel_initializer=init,
                                            name=f"block_{i}_attention")(h, h, use_causal_mask=True)
        x = x + h
        h = keras.layers.LayerNormalization(name=f"block_{i}_norm_2")(x)
        h = keras.layers.Dense(4 * args.dim, activation="gelu", kernel_initializer=init, name=f"block_{i}_mlp_up")(h)
        x = x + keras.layers.Dense(args.dim, kernel_initializer=init, name=f"block_{i}_mlp_down")(h)
    x = keras.layers.LayerNormalization(name="final_norm")(x)
    logits = keras.layers.Dense(args.vocab, kernel_initializer=init, name="lm_head")(x)
    return keras.Model(tokens, logits, name="decoder")


TARGETS = ("query", "key", "value", "attention_output", "mlp_up", "mlp_down")


def qlora_config(args, double_quant: bool) -> tf_lora.LoRAConfig:
    return tf_lora.LoRAConfig(
        rank=args.rank, alpha=2 * args.rank, dropout=0.0, target_modules=TARGETS,
        quantization=tf_lora.QLoRAConfig(group_size=args.group_size, double_quant=double_quant),
    )


# ------------------------------------------------------------------ args ---
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="random seed (deterministic runs)")
    p.add_argument("--layers", type=positive("--layers"), default=6, help="transformer blocks")
    p.add_argument("--dim", type=positive("--dim"), default=512, help="model width")
    p.add_argument("--heads", type=positive("--heads"), default=8, help="attention heads (must divide --dim)")
    p.add_argument("--vocab", type=positive("--vocab"), default=8192, help="vocabulary size")
    p.add_argument("--seq-len", type=positive("--seq-len"), default=128)
    p.add_argument("--rank", type=positive("--rank"), default=8, help="LoRA rank")
    p.add_argument("--group-size", type=positive("--group-size"), default=64,
                   help="NF4 group (bitsandbytes block) size")
    p.add_argument("--all-rows", action="store_true", help="print every layer (default: the first block and totals)")
    args = p.parse_args(argv)
    if args.dim % args.heads:
        p.error(f"--heads: must divide --dim={args.dim}, got {args.heads}")
    return args


# ------------------------------------------------------------------ main ---
def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    keras.utils.set_random_seed(args.seed)
    base = transformer(args)
    n_params = base.count_params()
    print(f"Decoder: {args.layers} blocks, width {args.dim}, {args.heads} heads, vocab {args.vocab}: "
          f"{n_params:,d} parameters ({_size(4 * n_params)} as float32)")

    reports = {}
    for dq in (False, True):
        t0 = time.time()
        reports[dq] = tf_lora.memory_report(tf_lora.adapt(base, qlora_config(args, dq)))
        print(f"adapted with QLoRA, double_quant={dq}: {time.time() - t0:.1f} s")

    # Cross-check the stored bytes with nf4.bits_per_parameter on the original kernels.
    kernels = {v.path.rsplit("/", 1)[0]: v for v in base.weights if v.name == "kernel"}  # by layer path
    rows, max_mismatch = [], 0.0
    for plain, double in zip(reports[False]["layers"], reports[True]["layers"]):
        assert plain["path"] == double["path"]
        kernel = np.asarray(kernels[plain["path"]])
        quantized = {dq: nf4.quantize(kernel, args.group_size, double_quant=dq) for dq in (False, True)}
        bits = {dq: nf4.bits_per_parameter(q) for dq, q in quantized.items()}
        error = {dq: float(np.linalg.norm(np.asarray(nf4.dequantize(q)) - kernel) / np.linalg.norm(kernel))
                 for dq, q in quantized.items()}
        max_mismatch = max(max_mismatch, abs(bits[False] - plain["bits_per_parameter"]),
                           abs(bits[True] - double["bits_per_parameter"]))
        rows.append({
            "path": plain["path"], "shape": tuple(int(d) for d in kernel.shape),
            "parameters": plain["base_parameters"], "float32_bytes": plain["base_float32_bytes"],
            "nf4_bytes": plain["base_stored_bytes"], "nf4_dq_bytes": double["base_stored_bytes"],
            "adapter_bytes": double["adapter_bytes"],
            "rel_error_nf4": error[False], "rel_error_nf4_dq": error[True],
        })

    total = lambda key: sum(r[key] for r in rows)  # noqa: E731
    report = {
        "model_parameters": n_params,
        "adapted_parameters": total("parameters"),
        "layers": rows,
        "float32_bytes": total("float32_bytes"),
        "nf4_bytes": total("nf4_bytes"),
        "nf4_dq_bytes": total("nf4_dq_bytes"),
        "adapter_bytes": total("adapter_bytes"),
        "other_bytes": reports[True]["other_bytes"],
        "bits_per_parameter_nf4": reports[False]["bits_per_parameter"],
        "bits_per_parameter_nf4_dq": reports[True]["bits_per_parameter"],
        "bits_mismatch_vs_nf4_module": max_mismatch,
        "kernel_rel_error_nf4": float(np.mean([r["rel_error_nf4"] for r in rows])),
        "kernel_rel_error_nf4_dq": float(np.mean([r["rel_error_nf4_dq"] for r in rows])),
        "total_seconds": time.time() - start,
    }
    print_report(args, report)
    return report


def print_report(args, r):
    header = ("layer", "kernel shape", "params", "float32", "NF4", "NF4+DQ", "LoRA r=%d" % args.rank)
    shown = r["layers"] if args.all_rows else [row for row in r["layers"] if row["path"].startswith("block_0")]
    lines = [(row["path"], "x".join(map(str, row["shape"])), f"{row['parameters']:,d}", _size(row["float32_bytes"]),
              _size(row["nf4_bytes"]), _size(row["nf4_dq_bytes"]), _size(row["adapter_bytes"])) for row in shown]
    if not args.all_rows and len(shown) < len(r["layers"]):
        lines.append((f"... ({len(r['layers']) - len(shown)} more layers, --all-rows)", "", "", "", "", "", ""))
    totals = (f"all {len(r['layers'])} adapted layers", "", f"{r['adapted_parameters']:,d}", _size(r["float32_bytes"]),
              _size(r["nf4_bytes"]), _size(r["nf4_dq_bytes"]), _size(r["adapter_bytes"]))
    widths = [max(len(row[i]) for row in lines + [header, totals]) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    print("\n=== base-weight memory per adapted layer ===")
    print(fmt(header))
    print("-" * len(fmt(header)))
    for row in lines:
        print(fmt(row))
    print("-" * len(fmt(header)))
    print(fmt(totals))
    print(f"\nbits per base parameter      : float32 32, NF4 {r['bits_per_parameter_nf4']:.3f}, "
          f"NF4+DQ {r['bits_per_parameter_nf4_dq']:.3f} (group size {args.group_size}; "
          f"max difference to nf4.bits_per_parameter: {r['bits_mismatch_vs_nf4_module']:.1e})")
    print(f"adapted base weights         : {_size(r['float32_bytes'])} -> {_size(r['nf4_bytes'])} (NF4, "
          f"{r['float32_bytes'] / r['nf4_bytes']:.2f}x smaller) -> {_size(r['nf4_dq_bytes'])} (NF4+DQ, "
          f"{r['float32_bytes'] / r['nf4_dq_bytes']:.2f}x smaller)")
    whole_fp32 = r["float32_bytes"] + r["other_bytes"]
    whole_q = r["nf4_dq_bytes"] + r["other_bytes"] + r["adapter_bytes"]
    print(f"whole model                  : {_size(whole_fp32)} float32 -> {_size(whole_q)} with QLoRA "
          f"(embeddings, norms, biases and lm_head stay float32: {_size(r['other_bytes'])})")
    print(f"quantization error           : ||W - dequant(W)|| / ||W|| = {r['kernel_rel_error_nf4']:.4f} (NF4), "
          f"{r['kernel_rel_error_nf4_dq']:.4f} (NF4+DQ), mean over the adapted kernels")
    print(f"total time                   : {r['total_seconds']:.1f} s")


if __name__ == "__main__":
    main()
