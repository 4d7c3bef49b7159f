"""LoRA for embeddings: a frozen table plus a trainable low-rank update, looked up by id.

``y = table[ids] + scaling * lora_a[ids] @ lora_b`` with `lora_a` (vocab, r) and
`lora_b` (r, dim), so only the looked-up rows of `lora_a` enter a step: the full
``table + scaling * lora_a @ lora_b`` is never formed (`merge()` forms it on request).

Init follows PEFT's `Embedding` layer (``peft/tuners/lora/layer.py``,
`reset_lora_parameters`): the id-side factor is zero and the other one normal
(std 1), for ``lora_init="he_uniform"`` and ``"gaussian"`` alike. In tf_lora's
layout that is `lora_a` = 0 (PEFT's ``lora_embedding_A``, transposed) and
`lora_b` ~ N(0, 1) (``lora_embedding_B``, transposed), so the adapted layer equals
the base at init. (He-uniform over a (vocab, r) factor would give rows of size
~sqrt(6 / vocab): a one-hot input is not what its fan-in assumes.)

Dropout (``LoRAConfig(dropout=...)``) acts on the looked-up rank-r rows
``lora_a[ids]``, the LoRA path's input-side activations (ids themselves cannot be
dropped; PEFT's Embedding applies no dropout at all).

`LoRAReversibleEmbedding` adapts ``keras.layers.ReversibleEmbedding`` (and
KerasHub's subclass, ``keras_hub.layers.ReversibleEmbedding``): with tied weights
its ``reverse=True`` projection uses the same adapted table,
``x @ table^T + scaling * (x @ lora_b^T) @ lora_a^T``, again without forming it.
"""

from __future__ import annotations

from typing import Any, Optional

import keras
from keras import ops

from tf_lora import _compat
from tf_lora.layers.base import LoRALayer, _invalid, _scaling


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(_invalid(name, "a positive integer", value))
    return value


@keras.saving.register_keras_serializable(package="tf_lora")
class LoRAEmbedding(LoRALayer):
    """`keras.layers.Embedding` with a frozen table and a trainable LoRA update.

    Args:
        input_dim: Vocabulary size.
        output_dim: Embedding size.
        embeddings_initializer: Initializer of the (frozen) table.
        mask_zero: As for `keras.layers.Embedding`: id 0 is padding
            (`compute_mask` gives ``ids != 0``).
        rank, alpha, dropout, use_rslora, lora_init, merged: see `LoRALayer`;
            the init is PEFT's for embeddings (see the module docstring).
        kernel_regularizer, kernel_constraint: the Embedding's
            ``embeddings_regularizer`` / ``embeddings_constraint`` (`from_layer`
            copies them, `to_base_layer` gives them back under those names).

    Example:
        >>> layer = LoRAEmbedding(10, 4, rank=2)
        >>> layer(np.array([[1, 2, 0]])).shape
        (1, 3, 4)
    """

    def __init__(self, input_dim: int, output_dim: int, embeddings_initializer: Any = "uniform",
                 mask_zero: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.input_dim = _positive_int("input_dim", input_dim)
        self.output_dim = _positive_int("output_dim", output_dim)
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.mask_zero = bool(mask_zero)
        self.supports_masking = self.mask_zero
        self.autocast = False  # as Embedding: read the table in float32, cast the rows once
        self.bias = None

    # The table is the "kernel" LoRALayer merges into (layout (vocab, dim), as lora_a @ lora_b).
    @property
    def kernel(self):
        return self.embeddings

    def _build_kernel(self, table_shape) -> None:
        """Creates the frozen table (QLoRA layers store it in NF4 instead)."""
        self.embeddings = self.add_weight(
            name="embeddings", shape=tuple(table_shape), initializer=self.embeddings_initializer,
            constraint=self.kernel_constraint, trainable=False,
        )

    def build(self, input_shape=None):
        self._build_kernel((self.input_dim, self.output_dim))
        self._build_lora((self.input_dim,), (self.output_dim,))

    def _make_lora_pair(self, suffix: str, rank: int, lora_init: str):
        # PEFT's Embedding init (both lora_init values): the id-side factor zero, the other N(0, 1).
        a = self.add_weight(name="lora_a" + suffix, shape=(self.input_dim, rank), initializer="zeros", trainable=True)
        b = self.add_weight(name="lora_b" + suffix, shape=(rank, self.output_dim),
                            initializer=keras.initializers.RandomNormal(stddev=1.0), trainable=True)
        return a, b

    # -- forward ---------------------------------------------------------------
    @staticmethod
    def _ids(inputs):
        return inputs if inputs.dtype in ("int32", "int64") else ops.cast(inputs, "int32")

    def _lookup(self, ids):
        """The base table's rows for `ids` (float32)."""
        return ops.take(self.embeddings, ids, axis=0)

    def _active_adapter(self):
        """``(lora_a, lora_b, scaling, dropout)`` of the adapter the forward pass adds, or None."""
        if self.merged or self.active_adapter is None:
            return None
        spec = self._spec(self.active_adapter)
        a, b = self.adapter_variables(self.active_adapter)
        return a, b, _scaling(spec["rank"], spec["alpha"], spec["use_rslora"]), spec["dropout"]

    def _embed(self, inputs, training=None):
        ids = self._ids(inputs)
        outputs = ops.cast(self._lookup(ids), self.compute_dtype)
        adapter = self._active_adapter()
        if adapter is not None:
            a, b, scaling, rate = adapter
            rows = ops.cast(ops.take(a, ids, axis=0), self.compute_dtype)  # (..., r): never the full table
            if rate > 0 and training:
                rows = keras.random.dropout(rows, rate, seed=self.seed_generator)
            outputs = outputs + ops.matmul(rows * scaling, ops.cast(b, self.compute_dtype))
        return outputs

    def call(self, inputs, training=None):
        return self._embed(inputs, training)

    def compute_mask(self, inputs, mask=None):
        if not self.mask_zero:
            return None
        return ops.not_equal(inputs, 0)

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.output_dim)

    def _lora_apply(self, inputs, lora_a, lora_b, scaling):
        """The update for integer `inputs` (LoRALayer's `_lora_call` uses it)."""
        rows = ops.take(lora_a, self._ids(inputs), axis=0)
        return ops.matmul(rows * scaling, lora_b)

    # -- conversion ------------------------------------------------------------
    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            input_dim=self.input_dim,
            output_dim=self.output_dim,
            embeddings_initializer=keras.initializers.serialize(self.embeddings_initializer),
            mask_zero=self.mask_zero,
        )
        return config

    @classmethod
    def _source_type(cls):
        return keras.layers.Embedding

    @classmethod
    def _source_kwargs(cls, layer) -> dict:
        return dict(input_dim=layer.input_dim, output_dim=layer.output_dim,
                    embeddings_initializer=layer.embeddings_initializer, mask_zero=layer.mask_zero)

    @classmethod
    def from_layer(cls, layer: keras.layers.Embedding, rank: int = 8, alpha: float = 32.0,
                   dropout: float = 0.0, use_rslora: bool = False, lora_init: str = "he_uniform",
                   **kwargs) -> "LoRAEmbedding":
        """A built adapter carrying `layer`'s name, dtype policy, table, regularizer and
        constraint (`kwargs` may override them). `layer` is not modified, except inside
        `adopting_base_weights(layer)`, where its table variables are adopted (frozen)."""
        source = cls._source_type()
        cls._check_source(layer, source, source.__name__)
        options = {"kernel_regularizer": layer.embeddings_regularizer,
                   "kernel_constraint": layer.embeddings_constraint,
                   "activity_regularizer": layer.activity_regularizer, **kwargs}
        new = cls(
            **cls._source_kwargs(layer), rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
            lora_init=lora_init, name=layer.name, dtype=layer.dtype_policy, **options,
        )
        with new._adopting(layer):  # in place: `layer`'s own table(s) (adopting_base_weights)
            new.build(None)
        new._copy_base_weights(layer)
        return new

    @classmethod
    def source_input_shape(cls, layer) -> tuple:
        return (None,)

    def _copy_base_weights(self, layer) -> None:
        self._copy_weight(self.embeddings, layer.embeddings)

    def _base_layer_kwargs(self) -> dict:
        return dict(
            input_dim=self.input_dim, output_dim=self.output_dim,
            embeddings_initializer=self.embeddings_initializer, mask_zero=self.mask_zero,
            embeddings_regularizer=self.kernel_regularizer, embeddings_constraint=self.kernel_constraint,
            activity_regularizer=self.activity_regularizer, name=self.name, dtype=self.dtype_policy,
        )

    def to_base_layer(self) -> keras.layers.Embedding:
        """A plain built `keras.layers.Embedding` with the merged table."""
        layer = keras.layers.Embedding(**self._base_layer_kwargs())
        layer.build()
        layer.embeddings.assign(self.merged_kernel())
        return layer


def _keras_hub_reversible() -> Optional[type]:
    try:
        import keras_hub

        return keras_hub.layers.ReversibleEmbedding
    except (ImportError, AttributeError):
        return None


# `base_class` names a class from this table (or a registered custom class), never an arbitrary import.
_KNOWN_BASES = {
    "keras.layers.ReversibleEmbedding": lambda: getattr(keras.layers, "ReversibleEmbedding", None),
    "keras_hub.layers.ReversibleEmbedding": _keras_hub_reversible,
}


def _base_class_name(cls: type) -> str:
    for name, find in _KNOWN_BASES.items():
        if find() is cls:
            return name
    return keras.saving.get_registered_name(cls)


def _base_class_of(name: Optional[str]) -> Optional[type]:
    if name in _KNOWN_BASES:
        return _KNOWN_BASES[name]()
    return keras.saving.get_registered_object(name) if name else None


def _reversible_type() -> Optional[type]:
    """``keras.layers.ReversibleEmbedding`` (Keras >= 3.13), else KerasHub's if importable."""
    return getattr(keras.layers, "ReversibleEmbedding", None) or _keras_hub_reversible()


@keras.saving.register_keras_serializable(package="tf_lora")
class LoRAReversibleEmbedding(LoRAEmbedding):
    """A ``ReversibleEmbedding`` (tied input/output embedding) with a LoRA update.

    The lookup is `LoRAEmbedding`'s. ``call(x, reverse=True)`` gives the logits
    ``x @ (table + scaling * lora_a @ lora_b)^T``, computed as ``x @ table^T +
    scaling * (dropout(x) @ lora_b^T) @ lora_a^T`` (rank-r intermediates only), then
    cast to `reverse_dtype` and soft-capped by `logit_soft_cap` as the base layer does.

    With ``tie_weights=False`` the separate `reverse_embeddings` kernel is kept frozen
    and *not* adapted: only the input lookup has a LoRA update (adapt the output
    projection as its own target if it needs one; it is not a Dense layer here, so
    that is not supported yet).

    `base_class` names the adapted class (``"keras_hub.layers.ReversibleEmbedding"``,
    ``"keras.layers.ReversibleEmbedding"`` or a registered custom subclass's name), so
    `to_base_layer` gives it back (Keras's class when that name is unknown).
    """

    def __init__(self, input_dim: int, output_dim: int, tie_weights: bool = True,
                 reverse_dtype: Any = None, logit_soft_cap: Optional[float] = None,
                 base_class: Optional[str] = None, **kwargs):
        super().__init__(input_dim, output_dim, **kwargs)
        self.tie_weights = bool(tie_weights)
        self.reverse_dtype = reverse_dtype
        self.logit_soft_cap = logit_soft_cap
        self.base_class = base_class
        self.reverse_embeddings = None

    def build(self, input_shape=None):
        super().build(input_shape)
        if not self.tie_weights:
            self.reverse_embeddings = self.add_weight(
                name="reverse_embeddings", shape=(self.output_dim, self.input_dim),
                initializer=self.embeddings_initializer, trainable=False,
            )

    def _reverse_table(self):
        """The base (dim, vocab) output kernel."""
        return ops.transpose(self.embeddings)

    def call(self, inputs, training=None, reverse=False):
        if not reverse:
            outputs = self._embed(inputs, training)
            if self.mask_zero:  # as ReversibleEmbedding: the mask is set here, compute_mask gives None
                _compat.set_keras_mask(outputs, ops.not_equal(inputs, 0))
            return outputs
        x = inputs
        kernel = self._reverse_table() if self.tie_weights else self.reverse_embeddings
        if self.reverse_dtype is not None:
            x, kernel = ops.cast(x, self.reverse_dtype), ops.cast(kernel, self.reverse_dtype)
        logits = ops.matmul(x, kernel)
        adapter = self._active_adapter() if self.tie_weights else None
        if adapter is not None:
            a, b, scaling, rate = adapter
            if self.reverse_dtype is not None:
                a, b = ops.cast(a, self.reverse_dtype), ops.cast(b, self.reverse_dtype)
            lora_in = keras.random.dropout(x, rate, seed=self.seed_generator) if rate > 0 and training else x
            hidden = ops.matmul(lora_in, ops.transpose(b)) * scaling  # (..., r)
            logits = logits + ops.cast(ops.matmul(hidden, ops.transpose(a)), logits.dtype)
        if self.logit_soft_cap is not None:
            cap = self.logit_soft_cap
            logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
        return logits

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_shape(self, input_shape, reverse=False):
        if reverse:
            return (*input_shape[:-1], self.input_dim)
        return (*input_shape, self.output_dim)

    def compute_output_spec(self, inputs, reverse=False):
        return keras.KerasTensor(self.compute_output_shape(inputs.shape, reverse), dtype=self.compute_dtype)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(tie_weights=self.tie_weights, reverse_dtype=self.reverse_dtype,
                      logit_soft_cap=self.logit_soft_cap, base_class=self.base_class)
        return config

    @classmethod
    def _source_type(cls):
        found = _reversible_type()
        if found is None:  # pragma: no cover - Keras >= 3.13 has it
            raise NotImplementedError("ReversibleEmbedding needs Keras >= 3.13 or keras_hub.")
        return found

    @classmethod
    def _source_kwargs(cls, layer) -> dict:
        return dict(super()._source_kwargs(layer), tie_weights=layer.tie_weights,
                    reverse_dtype=layer.reverse_dtype, logit_soft_cap=layer.logit_soft_cap,
                    base_class=_base_class_name(type(layer)))

    def _copy_base_weights(self, layer) -> None:
        super()._copy_base_weights(layer)
        if not self.tie_weights:
            self._copy_weight(self.reverse_embeddings, layer.reverse_embeddings)

    def to_base_layer(self):
        """A plain built layer of the adapted class with the merged table (and the
        untouched `reverse_embeddings` when untied)."""
        cls = _base_class_of(self.base_class)
        if not (isinstance(cls, type) and issubclass(cls, self._source_type())):
            cls = self._source_type()
        layer = cls(**self._base_layer_kwargs(), tie_weights=self.tie_weights,
                    reverse_dtype=self.reverse_dtype, logit_soft_cap=self.logit_soft_cap)
        layer.build()
        layer.embeddings.assign(self.merged_kernel())
        if not self.tie_weights:
            layer.reverse_embeddings.assign(ops.convert_to_numpy(self.reverse_embeddings))
        return layer
