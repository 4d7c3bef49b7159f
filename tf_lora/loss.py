"""A chunked LM loss: token cross-entropy without the (batch, T, vocab) logits.

`chunked_token_losses` computes each token's cross-entropy and whether its argmax is
the label from the final hidden states and the model's own output projection (KerasHub's
`ReversibleEmbedding` with ``reverse=True``: the tied token embedding or a separate head,
soft-capped where the model is, with its LoRA/QLoRA adapters if any), a chunk of tokens at
a time in a `tf.while_loop`, so at most one chunk's logits and their gradient exist at a
time (the idea of Liger Kernel's FusedLinearCrossEntropy and of Cut Cross-Entropy). In
training with a frozen projection (LoRA elsewhere), each chunk's gradient with respect to
its hidden states is taken in the forward pass from the logits already there (as Liger
does); with trained variables in the projection, the backward (`tf.custom_gradient`)
recomputes each chunk's logits.

`use_chunked_loss(model)` switches a KerasHub `CausalLM` to it for `fit` and `evaluate`:
inside its train/test step the model returns the backbone's hidden states, `compute_loss`
reduces the chunked token losses with the compiled loss's own reduction and
`sample_weight`, and the weighted accuracy KerasHub compiles with is fed each token's hit.
`predict`, `score`, `generate` and direct calls are unchanged.
"""

from __future__ import annotations

import contextlib
import types
from typing import Optional, Sequence, Tuple

import keras
import tensorflow as tf

from tf_lora import _compat
from tf_lora.layers.chunked_op import _check_positive_int

__all__ = ["DEFAULT_MAX_LOSS_MEMORY", "check_chunked_loss", "chunked_token_losses", "use_chunked_loss"]

DEFAULT_MAX_LOSS_MEMORY = 32 * 2**20
"""Budget for one chunk's float32 logits when none is given: 32 MiB, i.e. 170 tokens per
chunk at a vocabulary of 49,152 (the backward holds about three such buffers)."""

_ACCURACY_NAMES = ("accuracy", "acc", "sparse_categorical_accuracy")


def chunk_tokens(vocab_size: int, max_memory_bytes: Optional[int]) -> int:
    """Tokens per chunk whose float32 logits fit `max_memory_bytes`."""
    _check_positive_int("max_memory_bytes", max_memory_bytes)
    budget = DEFAULT_MAX_LOSS_MEMORY if max_memory_bytes is None else max_memory_bytes
    if budget < 4 * vocab_size:
        raise ValueError(
            f"Received an invalid value for `max_memory_bytes`, expected at least {4 * vocab_size} bytes: one "
            f"token's float32 logits over the vocabulary of {vocab_size}. Received: max_memory_bytes={budget}")
    return budget // (4 * vocab_size)


def _cross_entropy(z, y, with_d_z: bool):
    """Per-row cross-entropy, argmax hits and (if asked) d loss / d z = softmax(z) - one_hot(y)
    of (rows, vocab) logits, from TensorFlow's fused kernel (the one Keras' loss calls)."""
    loss, d_z = tf.raw_ops.SparseSoftmaxCrossEntropyWithLogits(features=z, labels=y)
    hit = tf.cast(tf.equal(tf.argmax(z, -1, output_type=tf.int32), y), tf.float32)
    return loss, hit, (d_z if with_d_z else None)


@tf.autograph.experimental.do_not_convert
def chunked_token_losses(hidden, labels, layer, trained: Sequence = (), chunk_size: int = 128,
                         training: bool = False) -> Tuple[tf.Tensor, tf.Tensor]:
    """Per-token cross-entropy and argmax hits of ``layer(hidden, reverse=True)``, in chunks.

    A single chunk (static token count) runs without a loop. In training, when none of
    `layer`'s variables is trained, each chunk's gradient with respect to its hidden rows
    is computed in the forward pass from the logits already there, and the backward only
    scales it by each token's upstream gradient (a token's loss is a scalar); otherwise
    the backward recomputes each chunk's logits.

    Args:
        hidden: (..., hidden_dim) final hidden states.
        labels: (...) integer token ids.
        layer: The output projection, called as ``layer(h, reverse=True)`` on (chunk,
            hidden_dim) rows (a KerasHub `ReversibleEmbedding` or tf_lora's adapted one).
        trained: The variables of `layer` that get gradients; the others are constants.
        chunk_size: Most tokens per chunk.
        training: Passed to `layer` (dropout of a LoRA adapter on it). Chunk ``i`` draws
            its dropout from the layer's seed state plus ``i`` (the same in the forward and
            the recomputation), and the state then advances past the chunks drawn.

    Returns:
        ``(losses, hits)``, float32 tensors of `labels`' shape: ``logsumexp(z) - z[label]``
        and ``argmax(z) == label`` for the logits `z` of each token. Gradients flow to
        `hidden` and `trained` through `losses`.
    """
    trained = list(trained)
    seeds = _seed_states(layer)
    ids = {id(v) for v in trained + seeds}
    # Everything `layer` reads is given to it through a StatelessScope: the trained variables
    # as inputs of the custom gradient, the others as constants read here, outside it.
    frozen = [(v, tf.stop_gradient(tf.convert_to_tensor(v.value))) for v in layer.variables if id(v) not in ids]
    seed_values = [tf.convert_to_tensor(v.value) for v in seeds]
    depth = hidden.shape[-1]
    h = tf.reshape(hidden, [-1, depth])
    y = tf.reshape(tf.cast(labels, tf.int32), [-1])
    static_n = None if h.shape[0] is None else max(1, -(-h.shape[0] // chunk_size))
    tokens = tf.shape(y)[0]
    n = static_n if static_n is not None else (tokens + chunk_size - 1) // chunk_size
    h = tf.pad(h, [[0, n * chunk_size - tokens], [0, 0]])
    y = tf.pad(y, [[0, n * chunk_size - tokens]])
    grad_in_forward = bool(training) and not trained

    def logits_of(h_i, values, i):
        chunk_seeds = [(v, s + tf.cast(tf.stack([0, i]), s.dtype)) for v, s in zip(seeds, seed_values)]
        with keras.StatelessScope(state_mapping=list(zip(trained, values)) + frozen + chunk_seeds):
            return tf.cast(layer(h_i, reverse=True, training=training), tf.float32)

    def rows(x, i):
        return tf.slice(x, [i * chunk_size] + [0] * (x.shape.rank - 1), [chunk_size] + [-1] * (x.shape.rank - 1))

    def loop(body, init):
        """`body` over the chunks: called once without a loop for a single static chunk."""
        if static_n == 1:
            return body(0, *init)
        return tf.while_loop(lambda i, *_: i < n, lambda i, *a: (i + 1, *body(i, *a)), (0, *init),
                             parallel_iterations=1)[1:]

    def chunk_grads(i, values, d_rows, with_values):
        """Gradients of sum(d_rows * loss) of chunk `i` w.r.t. its hidden rows (and `values`)."""
        h_i, y_i = rows(h, i), rows(y, i)
        with tf.GradientTape() as tape:
            tape.watch([h_i, *values])
            z = logits_of(h_i, values, i)
        loss, hit, d_z = _cross_entropy(z, y_i, True)
        sources = [h_i, *values] if with_values else [h_i]
        grads = tape.gradient(z, sources, output_gradients=d_z if d_rows is None else d_z * d_rows[:, None])
        return loss, hit, [tf.zeros_like(v) if g is None else tf.cast(g, v.dtype) for g, v in zip(grads, sources)]

    @tf.custom_gradient
    def run(h, *values):
        def body(i, loss_ta, hit_ta, *dh_ta):
            if grad_in_forward:
                loss, hit, (dh,) = chunk_grads(i, values, None, False)
                dh_ta = (dh_ta[0].write(i, dh),)
            else:
                loss, hit, _ = _cross_entropy(logits_of(rows(h, i), values, i), rows(y, i), False)
            return (loss_ta.write(i, loss), hit_ta.write(i, hit), *dh_ta)

        arrays = [tf.TensorArray(tf.float32, size=n, element_shape=[chunk_size]) for _ in range(2)]
        if grad_in_forward:  # d loss_t / d h_t of every token, (tokens, hidden_dim) like `h`
            arrays.append(tf.TensorArray(h.dtype, size=n, element_shape=[chunk_size, depth]))
        loss_ta, hit_ta, *dh_ta = loop(body, arrays)

        def grad(d_loss, _d_hits):
            d_loss = tf.cast(d_loss, tf.float32)  # (n * chunk_size,): the padding's rows are zero
            if grad_in_forward:
                return [dh_ta[0].concat() * tf.cast(d_loss[:, None], h.dtype)]

            def back(i, dh_back, *acc):
                _, _, grads = chunk_grads(i, values, rows(d_loss, i), True)
                return (dh_back.write(i, grads[0]), *[a + g for a, g in zip(acc, grads[1:])])

            init = (tf.TensorArray(h.dtype, size=n, element_shape=[chunk_size, depth]),
                    *[tf.zeros_like(v) for v in values])
            dh_back, *d_values = loop(back, init)
            return [dh_back.concat(), *d_values]

        return (loss_ta.concat(), hit_ta.concat()), grad

    losses, hits = run(h, *[tf.convert_to_tensor(v.value) for v in trained])
    for v, s in zip(seeds, seed_values):  # past every chunk's draws, as n calls of the layer would
        v.assign(s + tf.cast(tf.stack([0, n + 1]), s.dtype))
    shape = tf.shape(labels)
    return tf.reshape(losses[:tokens], shape), tf.reshape(hits[:tokens], shape)


def _seed_states(layer) -> list:
    """The state variables of the SeedGenerators `layer` and its sublayers draw from."""
    from tf_lora import surgery

    found, seen = [], set()
    for sub in [layer, *(sub for _, sub, _ in surgery.walk(layer))]:
        for value in vars(sub).values():
            if isinstance(value, keras.random.SeedGenerator) and id(value.state) not in seen:
                seen.add(id(value.state))
                found.append(value.state)
    return found


def _balanced(chunk_size: int, hidden) -> int:
    """At most `chunk_size` tokens a chunk, as few chunks, the least padding (static shapes)."""
    tokens = hidden.shape[:-1].num_elements()
    if not tokens:
        return chunk_size
    chunks = -(-tokens // chunk_size)
    return -(-tokens // chunks)


class _GivenLosses(keras.losses.Loss):
    """Reduces per-token losses given as `y_pred` exactly as the compiled loss would."""

    def call(self, y_true, y_pred):
        return y_pred


class _State:
    def __init__(self, chunk_size: int):
        self.chunk_size, self.active, self.training, self.hits = chunk_size, False, False, None


def _state(model) -> "_State":
    return model.__dict__["_tf_lora_chunked_loss"]


@contextlib.contextmanager
def _active(model, training: bool = True):
    state = _state(model)
    state.active, state.training = True, training
    try:
        yield
    finally:
        state.active, state.hits = False, None


def _check_compiled(model) -> None:
    """The compiled loss must be one the chunked path computes exactly."""
    loss = getattr(model, "loss", None)
    config = loss.get_config() if isinstance(loss, keras.losses.SparseCategoricalCrossentropy) else {}
    if not config.get("from_logits") or config.get("ignore_class") is not None:
        raise NotImplementedError(
            "The chunked LM loss computes keras.losses.SparseCategoricalCrossentropy(from_logits=True) (KerasHub's "
            f"default for a CausalLM). Received: loss={loss!r}; compile with that loss, or do not use the chunked loss.")


def _check_metrics(model) -> None:
    """Run after the step's metric update (Keras builds compiled metrics lazily)."""
    for metric in _compiled_metrics(model):
        if metric.name not in _ACCURACY_NAMES or not isinstance(
                metric, (keras.metrics.SparseCategoricalAccuracy, keras.metrics.MeanMetricWrapper)):
            raise NotImplementedError(
                f"The metric {metric.name!r} ({type(metric).__name__}) needs the full (batch, T, vocab) logits, "
                "which the chunked LM loss never builds; it computes SparseCategoricalAccuracy (KerasHub's default "
                "weighted metric) only. Compile without that metric, or do not use the chunked loss.")


def _compiled_metrics(model):
    """The metrics given to `compile` (the leaves of Keras' built compile-metrics container)."""
    found = []
    for metric in model.metrics:
        if type(metric).__name__ == "CompileMetrics":
            found.extend(metric.metrics)
    return found


def _call(self, inputs, *args, **kwargs):
    if not _state(self).active:
        return type(self).call(self, inputs, *args, **kwargs)
    return self.backbone(inputs, training=kwargs.get("training"))  # the hidden states


def _train_step(self, data):
    _check_compiled(self)
    with _active(self):
        return type(self).train_step(self, data)


def _test_step(self, data):
    _check_compiled(self)
    with _active(self, training=False):
        return type(self).test_step(self, data)


def _compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, **kwargs):
    state = _state(self)
    if not state.active:
        return type(self).compute_loss(self, x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, **kwargs)
    layer = self.backbone.token_embedding
    train = {id(v) for v in self.trainable_variables}
    trained = [v for v in layer.variables if id(v) in train]
    losses, state.hits = chunked_token_losses(y_pred, y, layer, trained, _balanced(state.chunk_size, y_pred),
                                              state.training)
    compiled = self.loss
    loss = _GivenLosses(name=compiled.name, reduction=compiled.reduction, dtype=compiled.dtype)(y, losses, sample_weight)
    for extra in self.losses:  # add_loss / regularizers, as Keras' compute_loss adds them
        loss = loss + tf.reduce_sum(tf.cast(extra, loss.dtype))
    return loss


def _compute_metrics(self, x, y, y_pred, sample_weight=None):
    state = _state(self)
    if not state.active:
        return type(self).compute_metrics(self, x, y, y_pred, sample_weight=sample_weight)
    # SparseCategoricalAccuracy of (label 1, scores [1 - hit, hit]) is each token's hit.
    hits = state.hits
    results = type(self).compute_metrics(self, x, tf.ones_like(hits, tf.int32), tf.stack([1 - hits, hits], -1),
                                         sample_weight=sample_weight)
    _check_metrics(self)  # at trace time: before any step runs
    return results


_OVERRIDES = {"call": _call, "train_step": _train_step, "test_step": _test_step,
              "compute_loss": _compute_loss, "compute_metrics": _compute_metrics}


def _check_causal_lm(model, name: str = "model"):
    """The projection layer of a KerasHub CausalLM whose output is ``token_embedding(backbone(x), reverse=True)``."""
    try:
        from keras_hub.models import CausalLM
    except ImportError:  # pragma: no cover - keras_hub is optional
        CausalLM = None
    if CausalLM is None or not isinstance(model, CausalLM):
        raise TypeError(f"Received an invalid value for `{name}`, expected a KerasHub CausalLM (the chunked LM loss "
                        f"needs its backbone and output projection). Received: {name}={type(model).__name__}")
    layer = getattr(model.backbone, "token_embedding", None)
    if layer is None or not model.layers or model.layers[-1] is not layer:
        raise NotImplementedError(
            f"The chunked LM loss needs a CausalLM whose logits are backbone.token_embedding(hidden, reverse=True); "
            f"{type(model).__name__} {model.name!r} computes them otherwise.")
    return layer


def check_chunked_loss(model, max_memory_bytes: Optional[int] = None) -> int:
    """Tokens per chunk `use_chunked_loss` would use; raises its errors, changing nothing."""
    return chunk_tokens(int(_check_causal_lm(model).input_dim), max_memory_bytes)


def use_chunked_loss(model, max_memory_bytes: Optional[int] = None):
    """Switches a KerasHub CausalLM's training loss to the chunked LM loss, in place.

    `fit` and `evaluate` then compute the token cross-entropy from the backbone's final
    hidden states and the output projection a chunk of tokens at a time (see
    `chunked_token_losses`): the (batch, T, vocab) logits and their gradient never
    exist. The loss equals the compiled ``SparseCategoricalCrossentropy(from_logits=True)``
    with the same `sample_weight` (KerasHub's padding and prompt masks) and reduction,
    and the compiled weighted accuracy is computed exactly. `predict`, `score`,
    `generate` and calling the model are unchanged. Another compiled loss or a metric
    that needs the logits raises `NotImplementedError` at `fit`/`evaluate`, naming it.

    Args:
        model: A KerasHub `CausalLM` (adapted or not).
        max_memory_bytes: Budget for one chunk's float32 logits (tokens x vocabulary x
            4 bytes); defaults to `DEFAULT_MAX_LOSS_MEMORY` (32 MiB).

    Returns:
        `model`, switched.

    Raises:
        TypeError: `model` is not a KerasHub CausalLM.
        ValueError: `max_memory_bytes` below one token's logits (the message gives the
            minimum).
        NotImplementedError: a CausalLM whose logits are not its token embedding's
            reverse projection of the backbone output.
        On any error the model is left unchanged.

    Example:
        >>> lm = tf_lora.use_chunked_loss(lm, max_memory_bytes=64 * 2**20)  # doctest: +SKIP
        >>> lm.fit(train_ds)                                                 # doctest: +SKIP
    """
    chunk = check_chunked_loss(model, max_memory_bytes)
    state = model.__dict__.get("_tf_lora_chunked_loss")
    if state is not None:
        state.chunk_size = chunk
    else:
        object.__setattr__(model, "_tf_lora_chunked_loss", _State(chunk))
        for name, fn in _OVERRIDES.items():
            object.__setattr__(model, name, types.MethodType(fn, model))
    _compat.reset_traced_functions(model)
    return model
