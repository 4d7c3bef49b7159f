"""What `AdaptedModel`'s trainer keeps besides the adapters: the frozen originals of
`modules_to_save` (PEFT's ``original_module``), identity sets of variables, and the graph
options of the train step (`AdaptedModel.train_graph_rewrites`)."""

from __future__ import annotations

import keras
import tensorflow as tf


def _graph_rewrites(value) -> dict:
    """`AdaptedModel.train_graph_rewrites` resolved: ``"auto"`` is a lighter grappler without an accelerator."""
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"Received an invalid value for `train_graph_rewrites`, expected \"auto\" or a dict "
                             f"of RewriterConfig fields. Received: train_graph_rewrites={value!r}")
        accelerated = any(d.device_type != "CPU" for d in tf.config.list_physical_devices())
        return {} if accelerated else {"meta_optimizer_iterations": 1, "memory_optimization": 1}  # ONE, NO_MEM_OPT
    return dict(value or {})


class _IdSet:
    """Membership by identity (Keras variables overload ==)."""

    def __init__(self, items):
        self._ids = {id(v) for v in items}

    def __contains__(self, item):
        return id(item) in self._ids


class _Originals:
    """Frozen copies of the `modules_to_save` variables, made when the model was adapted
    (PEFT's ``ModulesToSaveWrapper.original_module``; they cost the modules' size, as in
    PEFT). Not Keras-tracked, so `model.weights` is the adapted layers' alone; the model's
    `.keras` / ``.weights.h5`` files store them under ``tf_lora_original_<i>``.

    `switch` exchanges the values of each live variable and its original, one variable at a
    time (no second copy of a whole module); while switched, the live variables hold the
    originals and the copies the trained values.
    """

    PREFIX = "tf_lora_original_"

    def __init__(self, layers):
        seen, live = set(), []
        for layer in layers:
            for v in layer.weights:
                if id(v) not in seen:
                    seen.add(id(v))
                    live.append(v)
        self.pairs = [(v, keras.Variable(initializer=keras.ops.convert_to_tensor(v), dtype=v.dtype, trainable=False,
                                         name=f"original_{v.name}")) for v in live]
        self.switched = False
        self.known = True  # False once loaded from a file that predates them

    def switch(self, original: bool, model_name: str) -> None:
        if original == self.switched or not self.pairs:
            return
        if not self.known:
            raise ValueError(f"Model {model_name!r} was loaded from a file without the original `modules_to_save` "
                             "weights (saved by an older tf_lora), so it cannot give the base model's outputs. "
                             "Adapt the base model again and load the adapter into it (tf_lora.load_adapter).")
        for live, kept in self.pairs:
            value = keras.ops.copy(live)  # a read, not the variable itself (which the next line changes)
            live.assign(kept)
            kept.assign(value)
            del value
        self.switched = original

    def to_save(self) -> dict:
        return {f"{self.PREFIX}{i}": live if self.switched else kept for i, (live, kept) in enumerate(self.pairs)}

    def load(self, stored: dict, model_name: str) -> None:
        if not stored:
            self.known = not self.pairs
            return
        if len(stored) != len(self.pairs):
            raise ValueError(f"The file holds {len(stored)} original `modules_to_save` weights, model "
                             f"{model_name!r} has {len(self.pairs)}.")
        for i, (live, kept) in enumerate(self.pairs):
            (live if self.switched else kept).assign(stored[f"{self.PREFIX}{i}"])
        self.known = True
