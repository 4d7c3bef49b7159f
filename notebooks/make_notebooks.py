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


NOTEBOOKS = {
    "01_lora_basics.ipynb": NB01,
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
