"""Pieces the example scripts share: flag validation and a position embedding.

`PositionEmbedding` is created on first access (PEP 562 module `__getattr__`),
so a script that only validates flags (e.g. `long_sequence.py`'s parent
process, which measures in subprocesses) does not import Keras.
"""

from __future__ import annotations

import argparse
import math


def positive(flag: str, kind=int):
    """An argparse `type` accepting a positive int (or finite float) for `flag`."""
    what = "a positive integer" if kind is int else "a positive number"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects {what}, got {text!r}") from None
        if not value > 0 or (kind is float and math.isinf(value)):
            raise argparse.ArgumentTypeError(f"{flag} expects {what}, got {value}")
        return value

    return parse


_CACHE = {}


def _position_embedding():
    import keras

    @keras.saving.register_keras_serializable(package="tf_lora_examples")
    class PositionEmbedding(keras.layers.Layer):
        """Adds a learned position embedding to a (batch, seq, dim) input."""

        def __init__(self, max_len, **kwargs):
            super().__init__(**kwargs)
            self.max_len = max_len

        def build(self, input_shape):
            self.positions = self.add_weight(
                name="positions", shape=(self.max_len, input_shape[-1]), initializer="glorot_uniform"
            )

        def call(self, x):
            return x + keras.ops.cast(self.positions[: keras.ops.shape(x)[1]], x.dtype)

        def get_config(self):
            return {**super().get_config(), "max_len": self.max_len}

    return PositionEmbedding


def __getattr__(name):
    if name == "PositionEmbedding":
        if name not in _CACHE:
            _CACHE[name] = _position_embedding()
        return _CACHE[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
