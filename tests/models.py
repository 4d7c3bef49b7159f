"""Small models used across the tests: Functional with MultiHeadAttention,
Sequential, a nested model, a KerasHub-like Functional subclass with dict
inputs and attention projections nested in a custom block, and a model whose
layers carry regularizers and constraints (with its NumPy loss reference)."""

import keras
import numpy as np


def mha_classifier(seq=6, dim=8, heads=2, classes=3, name="mha_classifier"):
    inputs = keras.Input((seq, dim), name="tokens")
    x = keras.layers.MultiHeadAttention(heads, dim // heads, name="mha")(inputs, inputs)
    x = keras.layers.LayerNormalization(name="query_norm")(x + inputs)
    x = keras.layers.Dense(16, activation="relu", name="ffn")(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = keras.layers.Dense(classes, name="classifier")(x)
    return keras.Model(inputs, outputs, name=name)


def sequential_mlp():
    return keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(8, activation="relu", name="query"),
         keras.layers.Dense(8, name="value"), keras.layers.Dense(2, name="head")],
        name="mlp",
    )


def nested_model():
    inner_in = keras.Input((6, 8))
    inner_out = keras.layers.MultiHeadAttention(2, 4, name="attn")(inner_in, inner_in)
    encoder = keras.Model(inner_in, inner_out, name="encoder")
    inputs = keras.Input((6, 8))
    x = encoder(inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="classifier")(x), name="outer")


@keras.saving.register_keras_serializable(package="tf_lora_tests")
class Block(keras.layers.Layer):
    """Custom transformer block; its attention projections use a (heads, hidden,
    head_dim) kernel, i.e. the contracted axis is not the first."""

    def __init__(self, hidden=8, heads=2, **kwargs):
        super().__init__(**kwargs)
        self.hidden, self.heads = hidden, heads
        head_dim = hidden // heads
        self.query = keras.layers.EinsumDense("btd,ndh->btnh", (None, heads, head_dim), name="query")
        self.value = keras.layers.EinsumDense("btd,ndh->btnh", (None, heads, head_dim), name="value")
        self.attention_output = keras.layers.EinsumDense("btnh,nhd->btd", (None, hidden), name="attention_output")

    def build(self, input_shape):
        self.query.build(input_shape)
        self.value.build(input_shape)
        self.attention_output.build(input_shape[:-1] + (self.heads, self.hidden // self.heads))

    def call(self, x):
        q = self.query(x)
        v = self.value(x)
        scores = keras.ops.softmax(keras.ops.einsum("btnh,bsnh->bnts", q, q), axis=-1)
        return x + self.attention_output(keras.ops.einsum("bnts,bsnh->btnh", scores, v))

    def get_config(self):
        return {**super().get_config(), "hidden": self.hidden, "heads": self.heads}


@keras.saving.register_keras_serializable(package="tf_lora_tests")
class Backbone(keras.Model):
    """A KerasHub-style Functional subclass: dict inputs and outputs."""

    def __init__(self, hidden=8, layers=2, **kwargs):
        token = keras.Input((6, hidden), name="token_ids")
        mask = keras.Input((6,), name="padding_mask")
        x = token
        for i in range(layers):
            x = Block(hidden, name=f"block_{i}")(x)
        pooled = keras.layers.Dense(hidden, name="pooler")(keras.ops.mean(x, axis=1))
        super().__init__(
            inputs={"token_ids": token, "padding_mask": mask},
            outputs={"sequence_output": x, "pooled_output": pooled},
            **kwargs,
        )
        self.hidden, self.num_layers = hidden, layers

    def get_config(self):
        return {"hidden": self.hidden, "layers": self.num_layers, "name": self.name}


def data(model, n=16, seed=0):
    rng = np.random.default_rng(seed)
    struct = getattr(model, "_inputs_struct", None)
    if isinstance(struct, dict):
        return {k: rng.standard_normal((n,) + tuple(t.shape[1:])).astype("float32") for k, t in struct.items()}
    shapes = [tuple(t.shape[1:]) for t in model.inputs]
    xs = [rng.standard_normal((n,) + s).astype("float32") for s in shapes]
    return xs[0] if len(xs) == 1 else xs


WEIGHT_OPTIONS = ("kernel_regularizer", "bias_regularizer", "activity_regularizer", "kernel_constraint", "bias_constraint")


def regularized_model():
    """Dense -> EinsumDense -> Dense head; the first two carry every regularizer and constraint."""
    opts = dict(kernel_regularizer=keras.regularizers.L2(0.1), bias_regularizer=keras.regularizers.L1(0.05),
                activity_regularizer=keras.regularizers.L2(1.0), kernel_constraint=keras.constraints.MaxNorm(2.0),
                bias_constraint=keras.constraints.NonNeg(), bias_initializer="ones")
    inputs = keras.Input((5,))
    h = keras.layers.Dense(6, name="query", **opts)(inputs)
    h = keras.layers.EinsumDense("ab,bc->ac", (4,), bias_axes="c", name="value", **opts)(h)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(h), name="regularized")


def total_loss(model, x):
    """Sum of `model.losses` after calling it on `x`, float64."""
    model(x)
    return float(sum(np.asarray(loss, np.float64) for loss in model.losses))


def _activity_loss_divided_by_batch() -> bool:
    """Keras 3.15 divides an activity regularizer's loss by the batch size; Keras 3.5 does not."""
    layer = keras.layers.Dense(1, use_bias=False, kernel_initializer="ones", activity_regularizer=keras.regularizers.L2(1.0))
    layer(np.ones((2, 1), "float32"))
    return abs(float(keras.ops.convert_to_numpy(layer.losses[0])) - 1.0) < 1e-6


def reference_losses(kernels, biases, x, effective_kernels=None):
    """NumPy: L2(0.1) of the kernels, L1(0.05) of the biases, L2(1.0) of each
    layer's output, divided by the batch size where Keras does (its activity regularizer)."""
    per_batch = len(x) if _activity_loss_divided_by_batch() else 1
    total, h = 0.0, np.asarray(x, np.float64)
    for w, b, k in zip(kernels, biases, effective_kernels or kernels):
        total += 0.1 * np.sum(np.square(w, dtype=np.float64)) + 0.05 * np.sum(np.abs(b))
        h = h @ k + b
        total += np.sum(h ** 2) / per_batch
    return total
