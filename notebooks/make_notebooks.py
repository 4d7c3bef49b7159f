"""Builds the tutorial notebooks from the cell lists below and executes them.

Run from anywhere (after ``pip install -e ".[test]"``):

    python notebooks/make_notebooks.py            # all notebooks
    python notebooks/make_notebooks.py 02         # only those whose name contains "02"

Each notebook is a list of ``(kind, source)`` cells, ``kind`` being ``"md"`` or
``"code"``. The script writes ``notebooks/<name>.ipynb`` with the outputs of a
fresh execution (nbclient, kernel ``python3`` of this interpreter), so the
plots show on the repository page. Edit the cells here, never the .ipynb files.
"""

from __future__ import annotations

import os
import sys
import tempfile
import textwrap
import time

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))

SETUP = """\
import os, warnings
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")
import absl.logging; absl.logging.set_verbosity(absl.logging.ERROR)

import numpy as np
import matplotlib.pyplot as plt
import keras
import tensorflow as tf
import tf_lora

tf.get_logger().setLevel("ERROR")
plt.rcParams.update({"figure.dpi": 72, "figure.figsize": (7, 3.6), "axes.grid": True, "grid.alpha": 0.3})
keras.utils.set_random_seed(0)
print("tf_lora", tf_lora.__version__, "| keras", keras.__version__, "| tensorflow", tf.__version__)"""


# --------------------------------------------------------------------------------------
# 01: LoRA basics
# --------------------------------------------------------------------------------------
NB01 = [
    ("md", """\
# 1. LoRA basics

**Low-Rank Adaptation** (LoRA, Hu et al. 2021) fine-tunes a large pre-trained model by
*freezing* every weight matrix `W` and learning a small update next to it:

$$y = xW + b + \\frac{\\alpha}{r}\\,(xA)\\,B, \\qquad A \\in \\mathbb{R}^{d_{in} \\times r},\\; B \\in \\mathbb{R}^{r \\times d_{out}},\\; r \\ll d_{in}, d_{out}.$$

In this lesson you will

1. see why a low-rank update is enough (and how few parameters it needs),
2. build one `LoRADense` layer by hand and check its math against NumPy,
3. adapt a whole model with `tf_lora.adapt` and train **only** the adapters,
4. fold the adapters back into the weights with `tf_lora.merge` for zero-overhead inference.

Everything runs on a CPU in well under a minute."""),
    ("code", SETUP),
    ("md", """\
## 1.1 The low-rank idea

Fine-tuning changes a pre-trained matrix `W` into `W + ΔW`. The LoRA paper's observation is that
`ΔW` has a **low intrinsic rank**: a few directions carry almost all of the change. Below, a
256×256 "update" is built from 4 strong directions plus small noise, as fine-tuning updates
tend to look. Its singular values show the structure, and keeping only the top `r` directions
(the best rank-`r` approximation, by the Eckart–Young theorem) already reconstructs it almost
perfectly at `r = 4`."""),
    ("code", """\
rng = np.random.default_rng(0)
d = 256
delta_w = (rng.normal(size=(d, 4)) * [8, 6, 4, 3]) @ rng.normal(size=(4, d)) / np.sqrt(d)
delta_w += 0.01 * rng.normal(size=(d, d))            # small full-rank noise

u, s, vt = np.linalg.svd(delta_w)
ranks = np.arange(1, 33)
rel_error = [np.linalg.norm(delta_w - (u[:, :r] * s[:r]) @ vt[:r]) / np.linalg.norm(delta_w) for r in ranks]

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
ax1.semilogy(np.arange(1, d + 1), s, ".", ms=3)
ax1.set(title="singular values of ΔW", xlabel="index", ylabel="singular value")
ax2.plot(ranks, rel_error, "o-", ms=3)
ax2.set(title="best rank-r approximation", xlabel="rank r", ylabel="relative error ‖ΔW − ΔW_r‖ / ‖ΔW‖")
fig.tight_layout(); plt.show()
print(f"relative error at r=4: {rel_error[3]:.3f}, at r=8: {rel_error[7]:.3f}")"""),
    ("md", """\
LoRA does not compute an SVD: it *learns* the factors `A` and `B` directly by gradient
descent, and never forms the full `d_in × d_out` update while training.

## 1.2 Parameter counts vs rank

A full update of a `d_in × d_out` kernel has `d_in · d_out` parameters; LoRA has
`r · (d_in + d_out)`. For a 4096×4096 projection (a 7B-parameter language model) rank 8
trains 0.4 % of the parameters of that matrix."""),
    ("code", """\
ranks = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256])
fig, ax = plt.subplots()
for d_model, color in [(768, "C0"), (4096, "C1")]:
    ax.loglog(ranks, ranks * 2 * d_model, "o-", color=color, label=f"LoRA, {d_model}×{d_model}")
    ax.axhline(d_model**2, color=color, ls="--", label=f"full fine-tuning, {d_model}×{d_model}")
ax.set(xlabel="rank r", ylabel="trainable parameters per matrix", title="LoRA parameters grow linearly in r")
ax.legend(fontsize=8); plt.show()

for d_model in (768, 4096):
    print(f"{d_model}x{d_model}: full {d_model**2:>12,d}   rank 8: {8 * 2 * d_model:>8,d} "
          f"({100 * 8 * 2 * d_model / d_model**2:.2f} %)")"""),
    ("md", """\
## 1.3 One `LoRADense` by hand

`tf_lora.LoRADense.from_layer` turns a built `keras.layers.Dense` into an adapter layer:
the kernel and bias are copied and **frozen**, and two new trainable variables appear,
`lora_a` (he-uniform) and `lora_b` (zeros). Because `B = 0`, the adapted layer starts out
computing exactly what the original layer computes."""),
    ("code", """\
dense = keras.layers.Dense(32, name="proj")
x = np.random.default_rng(1).normal(size=(5, 64)).astype("float32")
y_dense = dense(x)                                   # builds the layer: kernel (64, 32)

lora = tf_lora.LoRADense.from_layer(dense, rank=4, alpha=8)
for v in lora.weights:
    print(f"{v.name:8s} shape={str(tuple(v.shape)):10s} trainable={v.trainable}")
print("scaling alpha/r =", lora.scaling)
print("max |LoRADense - Dense| at init:", float(np.max(np.abs(lora(x) - y_dense))))"""),
    ("md", """\
Let us give `B` some values (as training would) and check the layer against the formula
written in plain NumPy:"""),
    ("code", """\
lora.lora_b.assign(np.random.default_rng(2).normal(size=(4, 32)).astype("float32"))
W, b, A, B = (np.asarray(v) for v in (lora.kernel, lora.bias, lora.lora_a, lora.lora_b))
reference = x @ W + b + (8 / 4) * (x @ A) @ B
print("max |LoRADense - NumPy reference|:", float(np.max(np.abs(lora(x) - reference))))"""),
    ("md", """\
## 1.4 A whole model with `tf_lora.adapt`

Replacing layers by hand does not scale to real models, where the projections sit inside
`MultiHeadAttention` layers, blocks and nested models. `tf_lora.adapt(model, config)` walks the
model, matches layer names against `target_modules`, swaps in adapter layers and copies
the weights. The base model is never modified.

Our "pre-trained" model: a small regressor on 32 features. We first train it on **task A**."""),
    ("code", """\
def make_model():
    inputs = keras.Input((32,), name="features")
    h = keras.layers.Dense(128, activation="relu", name="hidden_1")(inputs)
    h = keras.layers.Dense(128, activation="relu", name="hidden_2")(h)
    return keras.Model(inputs, keras.layers.Dense(1, name="output")(h), name="regressor")

rng = np.random.default_rng(3)
teacher = rng.normal(size=(32, 64)) / np.sqrt(32), rng.normal(size=(64,)) / 8
def task_a(x):
    return np.tanh(x @ teacher[0]) @ teacher[1]

# Task B: the same function of *rotated* inputs, x -> x (I + U V^T) with U, V of rank 2.
# Such a change is exactly a rank-2 update of the first layer's kernel.
U, V = rng.normal(size=(32, 2)) * 0.5, rng.normal(size=(32, 2)) * 0.5
def task_b(x):
    return task_a(x + x @ V @ U.T)

x_train = rng.normal(size=(4096, 32)).astype("float32")
x_test = rng.normal(size=(1024, 32)).astype("float32")

base = make_model()
base.compile(optimizer=keras.optimizers.Adam(2e-3), loss="mse")
base.fit(x_train, task_a(x_train), batch_size=64, epochs=15, verbose=0)
print(f"base model, test MSE on task A: {base.evaluate(x_test, task_a(x_test), verbose=0):.4f}")
print(f"base model, test MSE on task B: {base.evaluate(x_test, task_b(x_test), verbose=0):.4f}  (needs adapting)")"""),
    ("code", """\
config = tf_lora.LoRAConfig(rank=4, alpha=8, dropout=0.0, target_modules=("hidden_1", "hidden_2"))
model = tf_lora.adapt(base, config)

tf_lora.print_trainable_parameters(model)
for layer in model.layers:
    print(f"{layer.name:10s} {type(layer).__name__}")
same = np.max(np.abs(model.predict(x_test, verbose=0) - base.predict(x_test, verbose=0)))
print("max |adapted - base| before training:", float(same))"""),
    ("md", """\
## 1.5 Training only the adapters

`adapt` returns a `tf_lora.LoRAModel`. Its `fit` differentiates only the adapter variables
(`model.lora_variables`); the base weights are frozen, so the optimizer keeps state for a few
thousand numbers instead of the whole model. For comparison we also fine-tune a copy of the
whole base model on task B (with a smaller learning rate, as is usual for full fine-tuning)."""),
    ("code", """\
print("variables fit updates:", [v.path for v in model.lora_variables])
kernel_before = np.array(model.get_layer("hidden_1").kernel)

model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
lora_history = model.fit(x_train, task_b(x_train), batch_size=64, epochs=15,
                         validation_data=(x_test, task_b(x_test)), verbose=0)

full = keras.models.clone_model(base); full.set_weights(base.get_weights())
full.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")   # a smaller step suits full fine-tuning
full_history = full.fit(x_train, task_b(x_train), batch_size=64, epochs=15,
                        validation_data=(x_test, task_b(x_test)), verbose=0)

n_lora = tf_lora.count_parameters(model).trainable
n_full = sum(int(np.prod(v.shape)) for v in full.trainable_weights)
fig, ax = plt.subplots()
ax.semilogy(lora_history.history["val_loss"], "o-", ms=3, label=f"LoRA r=4 ({n_lora:,d} trainable)")
ax.semilogy(full_history.history["val_loss"], "s-", ms=3, label=f"full fine-tuning ({n_full:,d} trainable)")
ax.axhline(base.evaluate(x_test, task_b(x_test), verbose=0), color="gray", ls="--", label="base model")
ax.set(xlabel="epoch", ylabel="test MSE on task B", title="fine-tuning on task B"); ax.legend(); plt.show()

print("frozen kernel changed:", bool(np.any(np.asarray(model.get_layer("hidden_1").kernel) != kernel_before)))
print(f"final test MSE: LoRA {lora_history.history['val_loss'][-1]:.4f}, full {full_history.history['val_loss'][-1]:.4f}; "
      f"LoRA trains {100 * n_lora / n_full:.1f} % of the parameters")"""),
    ("md", """\
With a small fraction of the trainable parameters, LoRA does as well as full fine-tuning
here: the change from task A to task B was low-rank, exactly what LoRA assumes (and
fewer free parameters also means less room to overfit the 4,096 training examples).

## 1.6 Saving adapters and merging for inference

An adapter file holds only `lora_a` / `lora_b` (kilobytes), so one base model can serve many
tasks. For deployment, `tf_lora.merge(model)` folds `W + (α/r)·A·B` into every kernel and
returns a plain Keras model: same outputs, no extra matmuls, no tf_lora layers."""),
    ("code", """\
import tempfile
with tempfile.TemporaryDirectory() as folder:
    size = tf_lora.save_adapter(model, os.path.join(folder, "task_b.adapter"))
base_size = sum(v.nbytes for v in base.get_weights())
print(f"adapter file: {size / 1024:.1f} KiB  vs  base weights: {base_size / 1024:.1f} KiB")

merged = tf_lora.merge(model)
print("merged layers:", [type(l).__name__ for l in merged.layers])
diff = np.max(np.abs(merged.predict(x_test, verbose=0) - model.predict(x_test, verbose=0)))
print(f"max |merged - adapted| = {diff:.2e}")"""),
    ("md", """\
**Summary.** LoRA freezes `W` and learns `(α/r)·A·B` with `r(d_in + d_out)` parameters;
`B = 0` at the start makes the adapted model equal to its base; `fit` on a `LoRAModel`
trains the adapters only; `merge` gives back a plain, fast Keras model.

Next: [02 — QLoRA and NF4](02_qlora_nf4.ipynb), storing the frozen base in 4 bits."""),
]


# --------------------------------------------------------------------------------------
# 02: QLoRA and NF4
# --------------------------------------------------------------------------------------
NB02 = [
    ("md", """\
# 2. QLoRA: a 4-bit base model with float adapters

LoRA makes the *trainable* part small, but the frozen base still sits in memory in
float32 (32 bits per weight). **QLoRA** (Dettmers et al. 2023) stores the frozen base in
**4 bits** and dequantizes it on the fly inside each layer; the LoRA adapters stay in
float32 and are trained exactly as before. Three ingredients make 4 bits work:

1. **NF4**, a 4-bit data type whose 16 levels fit normally distributed weights,
2. **block-wise absmax scaling** (groups of 64 weights share one scale),
3. **double quantization**: the scales themselves are stored in 8 bits.

In this lesson you will plot the NF4 levels against plain Int4, measure their quantization
errors on normal weights, count the bits per parameter with and without double
quantization, and fine-tune a small model with QLoRA. `tf_lora.nf4` is bit-compatible with
bitsandbytes (the library the QLoRA paper uses)."""),
    ("code", SETUP),
    ("md", """\
## 2.1 The 16 NF4 levels

NF4 puts its levels at **quantiles of the standard normal distribution**, so that each
level is used about equally often by normally distributed weights, and rescales them to
[-1, 1] with an exact 0. We can rebuild them with nothing but the standard library
(`statistics.NormalDist`), following bitsandbytes' `create_normal_map`: 8 positive quantiles,
7 negative ones and zero (an asymmetric split, so that 0 is exactly representable)."""),
    ("code", """\
from statistics import NormalDist

offset = 0.9677083                      # bitsandbytes: the mean of two outer quantile choices
inv_cdf = NormalDist().inv_cdf
positive = [inv_cdf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
negative = [-inv_cdf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
levels = np.sort(np.array(positive + [0.0] + negative))
levels /= np.abs(levels).max()

nf4_levels = np.array(tf_lora.nf4.CODEBOOK)
print("max |rebuilt - tf_lora.nf4.CODEBOOK| =", float(np.max(np.abs(levels - nf4_levels))))
print(np.round(nf4_levels, 4))"""),
    ("md", """\
Plain **Int4** with absmax scaling uses evenly spaced levels `k/7`, `k = -7..7`. Plotted over
the distribution of (normalised) weights, NF4 spends its levels where the weights are:
dense near zero, sparse in the tails."""),
    ("code", """\
int4_levels = np.arange(-7, 8) / 7
t = np.linspace(-1, 1, 400)
density = np.exp(-0.5 * (t * 2.5) ** 2)           # N(0, 1) weights divided by a typical absmax of ~2.5

fig, ax = plt.subplots(figsize=(8, 3))
ax.fill_between(t, 0, density, color="gray", alpha=0.2, label="weight density (normalised)")
ax.vlines(nf4_levels, 0.55, 1.0, color="C0", lw=2, label="NF4 (16 levels)")
ax.vlines(int4_levels, 0.0, 0.45, color="C3", lw=2, label="Int4 absmax (15 levels)")
ax.set(xlabel="normalised value  w / absmax", yticks=[], title="quantization levels")
ax.legend(loc="upper right", fontsize=8); plt.show()"""),
    ("md", """\
## 2.2 Quantization error on normal weights

Take a 1024×1024 kernel with `N(0, 0.02²)` entries (the usual initialisation of transformer
weights; trained weights stay close to normal). Both schemes cut the flattened weights into
groups of 64, divide by the group's absmax and round to the nearest level.
`tf_lora.nf4.quantize` / `dequantize` implement NF4; Int4 is four lines of NumPy."""),
    ("code", """\
rng = np.random.default_rng(0)
w = rng.normal(0.0, 0.02, size=(1024, 1024)).astype("float32")

q = tf_lora.nf4.quantize(w, group_size=64, double_quant=False)
w_nf4 = np.asarray(tf_lora.nf4.dequantize(q))

def int4_roundtrip(w, group_size=64):
    groups = w.T.reshape(-1, group_size)                    # the same blocking as NF4
    absmax = np.abs(groups).max(axis=1, keepdims=True)
    return (np.round(groups / absmax * 7) / 7 * absmax).reshape(w.T.shape).T
w_int4 = int4_roundtrip(w)

err_nf4, err_int4 = (w_nf4 - w).ravel(), (w_int4 - w).ravel()
rmse = lambda e: float(np.sqrt(np.mean(e**2)))
fig, ax = plt.subplots()
bins = np.linspace(-0.006, 0.006, 121)
ax.hist(err_int4, bins=bins, alpha=0.6, color="C3", label=f"Int4  RMSE {rmse(err_int4):.2e}")
ax.hist(err_nf4, bins=bins, alpha=0.6, color="C0", label=f"NF4   RMSE {rmse(err_nf4):.2e}")
ax.set(xlabel="dequantized − original", ylabel="weights", title="quantization error, 1M normal weights, groups of 64")
ax.legend(); plt.show()
print(f"NF4 error is {100 * (1 - rmse(err_nf4) / rmse(err_int4)):.0f}% smaller than Int4 at the same 4 bits")"""),
    ("md", """\
## 2.3 Bits per parameter, with and without double quantization

4-bit codes are not the whole cost: every group of 64 weights also stores its float32
absmax, 32/64 = 0.5 extra bits per weight. **Double quantization** stores the absmax values
as 8-bit codes (blocks of 256 with one float32 scale each), cutting the overhead to
8/64 + 32/(64·256) ≈ 0.127 bits. `tf_lora.nf4.bits_per_parameter` measures it from the
arrays actually stored."""),
    ("code", """\
group_sizes = [32, 64, 128, 256]
bits = {dq: [tf_lora.nf4.bits_per_parameter(tf_lora.nf4.quantize(w, group_size=g, double_quant=dq))
             for g in group_sizes] for dq in (False, True)}

x = np.arange(len(group_sizes))
fig, ax = plt.subplots()
for offset, dq, color in [(-0.2, False, "C1"), (0.2, True, "C0")]:
    bars = ax.bar(x + offset, bits[dq], width=0.4, color=color, label="NF4 + double quant" if dq else "NF4, float32 scales")
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
ax.axhline(4, color="gray", ls="--", lw=1)
ax.set(xticks=x, xticklabels=[f"group {g}" for g in group_sizes], ylim=(3.5, 5.2), ylabel="bits per parameter",
       title="storage cost of NF4 (float32: 32 bits)"); ax.legend(); plt.show()

q_dq = tf_lora.nf4.quantize(w, group_size=64, double_quant=True)
extra = rmse(np.asarray(tf_lora.nf4.dequantize(q_dq)).ravel() - w.ravel()) / rmse(err_nf4) - 1
print(f"group 64: {bits[False][1]:.3f} -> {bits[True][1]:.3f} bits; error grows by only {100 * extra:.2f}%")
print({name: (a.dtype.name, a.shape) for name, a in q_dq.arrays.items()})"""),
    ("md", """\
## 2.4 A small QLoRA fine-tune

As in lesson 1: a regressor trained on **task A**, to be adapted to **task B** (the same
function of inputs rotated by a rank-2 change). `LoRAConfig(quantization=QLoRAConfig())`
makes `adapt` store every targeted kernel in NF4 with double quantization; only
`lora_a`/`lora_b` train."""),
    ("code", """\
def make_model():
    inputs = keras.Input((32,), name="features")
    h = keras.layers.Dense(256, activation="relu", name="hidden_1")(inputs)
    h = keras.layers.Dense(256, activation="relu", name="hidden_2")(h)
    return keras.Model(inputs, keras.layers.Dense(1, name="output")(h), name="regressor")

rng = np.random.default_rng(3)
teacher = rng.normal(size=(32, 64)) / np.sqrt(32), rng.normal(size=(64,)) / 8
U, V = rng.normal(size=(32, 2)) * 0.5, rng.normal(size=(32, 2)) * 0.5
task_a = lambda x: np.tanh(x @ teacher[0]) @ teacher[1]
task_b = lambda x: task_a(x + x @ V @ U.T)
x_train = rng.normal(size=(4096, 32)).astype("float32")
x_test = rng.normal(size=(1024, 32)).astype("float32")

base = make_model()
base.compile(optimizer=keras.optimizers.Adam(2e-3), loss="mse")
base.fit(x_train, task_a(x_train), batch_size=64, epochs=15, verbose=0)

targets = ("hidden_1", "hidden_2")
lora = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=4, alpha=8, dropout=0.0, target_modules=targets))
qlora = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=4, alpha=8, dropout=0.0, target_modules=targets,
                                               quantization=tf_lora.QLoRAConfig()))
mse = lambda m, f: float(np.mean((m.predict(x_test, verbose=0)[:, 0] - f(x_test)) ** 2))
print(f"task A test MSE: float32 base {mse(base, task_a):.4f}, NF4 base {mse(qlora, task_a):.4f}")
print(f"task B test MSE before fine-tuning: {mse(base, task_b):.4f}")
for v in qlora.get_layer("hidden_1").weights:
    print(f"  hidden_1/{v.name:17s} {v.dtype:8s} {str(tuple(v.shape)):10s} trainable={v.trainable}")"""),
    ("code", """\
histories = {}
for name, model in [("LoRA, float32 base", lora), ("QLoRA, NF4 base", qlora)]:
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    histories[name] = model.fit(x_train, task_b(x_train), batch_size=64, epochs=15,
                                validation_data=(x_test, task_b(x_test)), verbose=0).history["val_loss"]

fig, ax = plt.subplots()
for name, curve in histories.items():
    ax.semilogy(curve, "o-", ms=3, label=name)
ax.axhline(mse(base, task_b), color="gray", ls="--", label="base model")
ax.set(xlabel="epoch", ylabel="test MSE on task B", title="LoRA vs QLoRA, rank 4"); ax.legend(); plt.show()
print({name: round(curve[-1], 4) for name, curve in histories.items()})"""),
    ("md", """\
QLoRA ends close to LoRA: the adapters also learn to compensate part of the quantization
error. `tf_lora.print_memory_report` counts the bytes the adapted layers really hold:"""),
    ("code", """\
report = tf_lora.print_memory_report(qlora)
merged = tf_lora.merge(qlora)      # plain Dense layers: dequantized kernel + (alpha/r)·A·B
diff = np.max(np.abs(merged.predict(x_test, verbose=0) - qlora.predict(x_test, verbose=0)))
print(f"\\nmerged float32 model vs QLoRA model: max |diff| = {diff:.2e}")"""),
    ("md", """\
**Summary.** NF4 places 16 levels at normal quantiles and beats evenly spaced Int4 on normal
weights; absmax groups of 64 cost 0.5 bit per weight, double quantization cuts that to
0.127 (4.127 bits in all, 7.75× less than float32); a QLoRA model trains its float32
adapters on top of the 4-bit base exactly like a LoRA model, and merges to a plain model.

Next: [03 — chunked attention](03_chunked_attention.ipynb), keeping long sequences in memory."""),
]


# --------------------------------------------------------------------------------------
# 03: chunked attention
# --------------------------------------------------------------------------------------
NB03 = [
    ("md", """\
# 3. Chunked attention: exact attention in linear memory

Self-attention compares every position with every other one. For a sequence of `T` tokens
that is a `T × T` matrix of scores per head, and training keeps it (and the softmax
probabilities) for the backward pass. Doubling the context length quadruples that memory.

**Chunked attention** (the idea behind memory-efficient attention and FlashAttention)
computes exactly the same result in tiles of queries and keys, with a *running* softmax, so
no `T × T` matrix ever exists. In this lesson you will

1. compute how large the score matrix gets,
2. derive the **online softmax** step by step in NumPy,
3. check that `tf_lora.chunked_attention` and `tf_lora.ChunkedAttention` equal full
   attention (outputs and gradients),
4. measure peak memory against sequence length for both."""),
    ("code", SETUP),
    ("md", """\
## 3.1 Why attention memory is quadratic

For queries, keys and values `Q, K, V` of shape `(T, d)` per head,
`attention = softmax(Q Kᵀ / √d) V`. The inputs and the output grow like `T · d`; the scores
`Q Kᵀ` grow like `T²`. With 12 heads (a BERT-base / GPT-2 layer), one float32 score tensor:"""),
    ("code", """\
T = 2 ** np.arange(9, 17)                        # 512 ... 65,536 tokens
heads, d = 12, 64
score_bytes = 4 * heads * T.astype(float) ** 2
qkv_bytes = 4 * 3 * heads * d * T.astype(float)

fig, ax = plt.subplots()
ax.loglog(T, score_bytes / 2**20, "o-", label="scores (heads, T, T)")
ax.loglog(T, qkv_bytes / 2**20, "s-", label="Q, K, V (3, T, heads, d)")
ax.set(xlabel="sequence length T", ylabel="MiB, float32, one layer, batch 1",
       title="the score matrix is quadratic in T"); ax.legend(); plt.show()
for t, b in zip(T[::2], score_bytes[::2]):
    print(f"T = {t:6,d}: scores {b / 2**30:8.2f} GiB per layer")"""),
    ("md", """\
At 32k tokens a single layer's scores take 48 GiB, and a training step keeps several such
tensors per layer. The way out: never hold all of a row's scores at once.

## 3.2 The online softmax, step by step

Take **one query** and its scores `s₁ … s_T` against all keys. The output is
`o = Σⱼ softmax(s)ⱼ vⱼ`. Reading the keys in chunks, we keep three running quantities:

* `m`: the largest score seen so far (for numerical stability),
* `l`: the sum of `exp(sⱼ − m)` so far,
* `acc`: the sum of `exp(sⱼ − m) vⱼ` so far.

When a new chunk raises the maximum from `m` to `m'`, everything accumulated so far was
computed relative to the old `m`; multiplying by `exp(m − m')` rescales it. At the end,
`o = acc / l`."""),
    ("code", """\
rng = np.random.default_rng(0)
T, d, chunk = 12, 4, 4
q = rng.normal(size=d)
K, Vv = rng.normal(size=(T, d)), rng.normal(size=(T, d))
s = K @ q / np.sqrt(d)                              # the scores of this query

m, l, acc = -np.inf, 0.0, np.zeros(d)
for start in range(0, T, chunk):
    s_c, v_c = s[start:start + chunk], Vv[start:start + chunk]
    m_new = max(m, s_c.max())
    correction = np.exp(m - m_new)                  # rescales what was summed with the old max
    p = np.exp(s_c - m_new)
    l = l * correction + p.sum()
    acc = acc * correction + p @ v_c
    m = m_new
    print(f"keys {start:2d}-{start + chunk - 1:2d}: max {m:+.3f}  correction {correction:.3f}  sum {l:.3f}"
          + ("   (first chunk: nothing to rescale yet)" if start == 0 else ""))

full = np.exp(s - s.max()) / np.exp(s - s.max()).sum() @ Vv
print("online result :", np.round(acc / l, 6))
print("full softmax  :", np.round(full, 6))
print("max |difference| =", float(np.max(np.abs(acc / l - full))))"""),
    ("md", """\
The same recurrence works for a whole **block of queries** at once (the running `m`, `l`
are then vectors), which gives the chunked algorithm: loop over query chunks, and inside
over key chunks, holding one `(query chunk × key chunk)` tile of scores at a time. With a
causal mask, tiles entirely above the diagonal are skipped."""),
    ("code", """\
def chunked_attention_numpy(Q, K, V, chunk=64, causal=False):
    T, d = Q.shape
    out = np.zeros_like(V)
    for i in range(0, T, chunk):
        q = Q[i:i + chunk]
        m = np.full(len(q), -np.inf); l = np.zeros(len(q)); acc = np.zeros((len(q), V.shape[1]))
        for j in range(0, (i + chunk) if causal else T, chunk):   # causal: skip tiles above the diagonal
            s = q @ K[j:j + chunk].T / np.sqrt(d)                     # one (chunk x chunk) tile
            if causal:
                s = np.where(np.arange(i, i + len(q))[:, None] >= np.arange(j, j + s.shape[1]), s, -np.inf)
            m_new = np.maximum(m, s.max(axis=1))
            p = np.exp(s - m_new[:, None])
            correction = np.exp(m - m_new)
            l = l * correction + p.sum(axis=1)
            acc = acc * correction[:, None] + p @ V[j:j + chunk]
            m = m_new
        out[i:i + chunk] = acc / l[:, None]
    return out

def full_attention_numpy(Q, K, V, causal=False):
    s = Q @ K.T / np.sqrt(Q.shape[1])
    if causal:
        s = np.where(np.tril(np.ones(s.shape, bool)), s, -np.inf)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)) @ V

Q, K, V = (rng.normal(size=(500, 32)) for _ in range(3))
for causal in (False, True):
    diff = np.max(np.abs(chunked_attention_numpy(Q, K, V, 64, causal) - full_attention_numpy(Q, K, V, causal)))
    print(f"causal={causal}: max |chunked - full| = {diff:.1e}")

n = -(-500 // 64)
tiles = np.tril(np.ones((n, n)))
fig, ax = plt.subplots(figsize=(3.4, 3.4))
ax.imshow(tiles, cmap="Blues", vmin=0, vmax=1.4)
ax.set(title="causal: tiles computed", xlabel="key chunk", ylabel="query chunk"); ax.grid(False); plt.show()"""),
    ("md", """\
## 3.3 tf_lora's chunked attention equals full attention

`tf_lora.chunked_attention(q, k, v, ...)` is the TensorFlow op (inputs `(batch, T, heads,
head_dim)`), with a custom gradient that **recomputes** tiles in the backward pass instead of
storing them (as FlashAttention does). `tf_lora.ChunkedAttention` is a drop-in
`keras.layers.MultiHeadAttention`: same arguments, same weights, same projections (so LoRA
can target `query`, `key`, `value`). Let us check outputs *and gradients* against Keras."""),
    ("code", """\
x = tf.random.normal((2, 300, 64), seed=1)
mha = keras.layers.MultiHeadAttention(num_heads=4, key_dim=16)
chunked = tf_lora.ChunkedAttention(num_heads=4, key_dim=16, query_chunk_size=64, key_chunk_size=64)
mha(x, x); chunked(x, x)
chunked.set_weights(mha.get_weights())                     # the very same weights

def output_and_grads(layer):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, x, use_causal_mask=True)
        loss = tf.reduce_sum(tf.sin(y))
    return y, tape.gradient(loss, [x] + layer.trainable_weights)

y_full, g_full = output_and_grads(mha)
y_chunk, g_chunk = output_and_grads(chunked)
print(f"max |output difference|   = {float(tf.reduce_max(tf.abs(y_full - y_chunk))):.1e}")
flat = lambda grads: np.concatenate([np.ravel(g) for g in grads])
relative = np.linalg.norm(flat(g_full) - flat(g_chunk)) / np.linalg.norm(flat(g_full))
print(f"relative gradient difference ‖Δg‖ / ‖g‖ = {relative:.1e}  (input and all {len(g_full) - 1} weights)")

q = tf.random.normal((1, 500, 2, 32), seed=2); k = tf.random.normal((1, 500, 2, 32), seed=3)
v = tf.random.normal((1, 500, 2, 32), seed=4)
op = tf_lora.chunked_attention(q, k, v, causal=True, query_chunk_size=64, key_chunk_size=64)
reference = np.stack([full_attention_numpy(q[0, :, h].numpy(), k[0, :, h].numpy(), v[0, :, h].numpy(), causal=True)
                      for h in range(2)], axis=1)
print(f"tf_lora.chunked_attention vs the NumPy reference: {np.max(np.abs(op[0].numpy() - reference)):.1e}")"""),
    ("md", """\
The differences are float32 rounding (the sums are taken in a different order), not an
approximation.

## 3.4 Peak memory against sequence length

TensorFlow's CPU allocator tracks the bytes in use and their peak. To measure one training
step (forward + backward of an attention layer) we reset the peak statistic, run the step
as a `tf.function`, and read the peak minus what was allocated before. (Between
measurements nothing else runs; for whole programs, measure each variant in a fresh process,
as `examples/long_sequence.py` does.)"""),
    ("code", """\
import gc, time

def peak_training_bytes(layer, T, batch=1, width=128):
    x = tf.random.normal((batch, T, width))
    layer(x[:, :8], x[:, :8])                                # build
    @tf.function(autograph=False)
    def step():
        with tf.GradientTape() as tape:
            y = layer(x, x, use_causal_mask=True)
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, layer.trainable_weights)
    step.get_concrete_function()                             # trace outside the measurement
    gc.collect()
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    return tf.config.experimental.get_memory_info("CPU:0")["peak"] - before, seconds

lengths = [256, 512, 1024, 2048, 4096]
results = {"MultiHeadAttention": [], "ChunkedAttention": []}
for T in lengths + [8192]:
    if T <= lengths[-1]:
        results["MultiHeadAttention"].append(peak_training_bytes(keras.layers.MultiHeadAttention(4, 32), T))
    results["ChunkedAttention"].append(
        peak_training_bytes(tf_lora.ChunkedAttention(4, 32, query_chunk_size=256, key_chunk_size=256), T))

print(f"{'T':>6s} {'MultiHeadAttention':>20s} {'ChunkedAttention':>18s}")
for i, T in enumerate(lengths + [8192]):
    mha_mib = f"{results['MultiHeadAttention'][i][0] / 2**20:,.1f} MiB" if T <= lengths[-1] else "(skipped)"
    print(f"{T:6d} {mha_mib:>20s} {results['ChunkedAttention'][i][0] / 2**20:>14,.1f} MiB")"""),
    ("code", """\
fig, ax = plt.subplots()
mha_peak = np.array([b for b, _ in results["MultiHeadAttention"]]) / 2**20
chunk_peak = np.array([b for b, _ in results["ChunkedAttention"]]) / 2**20
ax.loglog(lengths, mha_peak, "o-", color="C3", label="keras MultiHeadAttention")
ax.loglog(lengths + [8192], chunk_peak, "s-", color="C0", label="tf_lora ChunkedAttention (256 x 256 tiles)")
ax.loglog(lengths, 4 * 4 * np.array(lengths, float) ** 2 / 2**20, ":", color="gray", label="one (heads, T, T) float32 tensor")
ax.set_xticks(lengths + [8192], [str(t) for t in lengths + [8192]], minor=False)
ax.xaxis.set_minor_formatter(plt.NullFormatter())
ax.set(xlabel="sequence length T", ylabel="peak MiB, one training step",
       title="attention layer, 4 heads, batch 1: forward + backward"); ax.legend(fontsize=8); plt.show()
print(f"at T = {lengths[-1]}: MultiHeadAttention needs {mha_peak[len(lengths) - 1] / chunk_peak[len(lengths) - 1]:.0f}x "
      f"the memory of ChunkedAttention")"""),
    ("md", """\
MultiHeadAttention's peak grows 4× per doubling of `T` (a few `T × T` tensors); the chunked
layer's grows about 2× (its inputs, outputs and a fixed-size tile). In a model, switch every
attention layer at once:

```python
model = tf_lora.use_chunked_attention(model, query_chunk_size=256, key_chunk_size=256)
# or, while adding LoRA adapters:
model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=8, attention="chunked"))
```

**Summary.** Attention's scores are `T × T`; the online softmax (running max, running sum,
rescaling by `exp(m − m')`) computes the exact same softmax tile by tile; recomputing tiles in
the backward pass keeps training memory linear in `T`. See `examples/long_sequence.py` for
training a language model both ways."""),
]


NOTEBOOKS = {
    "01_lora_basics.ipynb": NB01,
    "02_qlora_nf4.ipynb": NB02,
    "03_chunked_attention.ipynb": NB03,
}


def build(cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata.update(
        kernelspec={"name": "python3", "display_name": "Python 3", "language": "python"},
        language_info={"name": "python"},
    )
    for kind, source in cells:
        source = textwrap.dedent(source).strip("\n")
        nb.cells.append(nbformat.v4.new_markdown_cell(source) if kind == "md" else nbformat.v4.new_code_cell(source))
    for i, cell in enumerate(nb.cells):  # stable ids keep regenerated diffs small
        cell.id = f"cell-{i:02d}"
    return nb


def python3_kernel_env(folder: str) -> dict:
    """A JUPYTER_PATH in which kernel "python3" is this interpreter (works in any venv)."""
    from ipykernel.kernelspec import write_kernel_spec

    write_kernel_spec(path=os.path.join(folder, "kernels", "python3"))
    return {"JUPYTER_PATH": folder + os.pathsep + os.environ.get("JUPYTER_PATH", "")}


def execute(nb: nbformat.NotebookNode, timeout: int = 300) -> nbformat.NotebookNode:
    """Runs `nb` in notebooks/ with kernel python3 of this interpreter; raises on any error."""
    with tempfile.TemporaryDirectory() as folder:
        saved = dict(os.environ)
        os.environ.update(python3_kernel_env(folder))
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        try:
            client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                                    resources={"metadata": {"path": HERE}})
            client.execute()
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return nb


_LOG_NOISE = ("WARNING: All log messages before absl", "I0000 ", "W0000 ", "E0000 ")


def strip_log_noise(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drops TensorFlow's C++ start-up log lines (machine-specific) from stderr outputs."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        outputs = []
        for out in cell.outputs:
            if out.output_type == "stream" and out.name == "stderr":
                out.text = "".join(l for l in out.text.splitlines(True) if not l.startswith(_LOG_NOISE))
                if not out.text.strip():
                    continue
            outputs.append(out)
        cell.outputs = outputs
    return nb


def main(argv=None) -> None:
    selected = (argv if argv is not None else sys.argv[1:]) or list(NOTEBOOKS)
    for name, cells in NOTEBOOKS.items():
        if not any(s in name for s in selected):
            continue
        t0 = time.time()
        nb = strip_log_noise(execute(build(cells)))
        path = os.path.join(HERE, name)
        nbformat.write(nb, path)
        print(f"{name}: executed in {time.time() - t0:.1f} s, {os.path.getsize(path) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
