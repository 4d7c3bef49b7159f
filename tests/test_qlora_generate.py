"""QLoRA generation dequantizes each kernel once per `generate` call, not once per token (issue 23
part 4), with the same tokens as a greedy loop over the full forward pass: eagerly, in a graph
and under XLA; training afterwards is unaffected (no cache outlives the call)."""

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("keras_hub")
pytest.importorskip("tokenizers")

import tf_lora  # noqa: E402
from tf_lora.layers import qlora  # noqa: E402
from test_gguf import _logits, write_gguf  # noqa: E402

PROMPT = [[5, 17, 100, 42, 7, 9, 0, 0, 0, 0, 0, 0], [8, 8, 8, 1, 2, 150, 151, 152, 0, 0, 0, 0]]
LENGTHS = [6, 8]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_gguf(tmp_path_factory.mktemp("g") / "m.gguf", hidden=32, ffn=64, layers=2)
    cfg = tf_lora.LoRAConfig(rank=4, dropout=0.0, target_modules="all-linear", quantization=tf_lora.QLoRAConfig())
    lm = tf_lora.adapt(tf_lora.load_gguf(path, sequence_length=16), cfg, verbose=0)
    rng = np.random.default_rng(0)
    for layer in lm._flatten_layers():
        if isinstance(layer, qlora._NF4Base):
            layer.lora_b.assign(rng.normal(0, 0.3, tuple(layer.lora_b.shape)).astype("float32"))
    lm.preprocessor = None
    greedy = []
    for row, n in zip(PROMPT, LENGTHS):
        ids = row[:n]
        while len(ids) < len(row):
            ids.append(int(_logits(lm, [ids])[0, -1].argmax()))
        greedy.append(ids)
    return lm, greedy


def _generate(lm):
    ids = np.asarray(PROMPT, "int32")
    mask = np.arange(ids.shape[1])[None] < np.asarray(LENGTHS)[:, None]
    out = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
    return np.asarray(out["token_ids"]).tolist()


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_generate_dequantizes_once_per_call(model, monkeypatch, mode):
    lm, greedy = model
    layers = [la for la in lm._flatten_layers() if isinstance(la, qlora._NF4Base)]
    assert len(layers) == 14  # 7 projections in each of the 2 blocks
    calls = []
    original = qlora._NF4Base._dequantize_now
    monkeypatch.setattr(qlora._NF4Base, "_dequantize_now", lambda self: calls.append(self.name) or original(self))
    lm.compile(sampler="greedy", run_eagerly=mode == "eager", jit_compile=mode == "xla")
    assert _generate(lm) == greedy
    # Eagerly each call runs; in a graph each call is traced once. Per token (6 + 4 new tokens for the
    # shorter row), the code before this change made 11 calls a layer eagerly and 2 (prefill + loop body)
    # a layer when traced.
    assert sorted(calls) == sorted(la.name for la in layers)
    calls.clear()
    assert _generate(lm) == greedy and len(calls) == (len(layers) if mode == "eager" else 0)
    assert qlora._GENERATION.kernels is None


def test_training_after_generate(model):
    lm, _ = model
    lm.compile(sampler="greedy")
    _generate(lm)
    lm.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    ids = np.asarray(PROMPT, "int32")
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}
    before = [np.asarray(la.lora_a) for la in lm._flatten_layers() if isinstance(la, qlora._NF4Base)]
    lm.fit(x, ids, epochs=1, verbose=0)
    after = [np.asarray(la.lora_a) for la in lm._flatten_layers() if isinstance(la, qlora._NF4Base)]
    assert all(not np.array_equal(a, b) for a, b in zip(before, after))


def _batch():
    ids = np.asarray(PROMPT, "int32")
    return {"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}, ids


def test_fit_traces_the_train_step_once(model):
    # The optimizer's state is built before the first trace: a tf.function that creates variables
    # on its first call is traced twice (issue 23: twice ~60,000 ops for SmolLM2 all-linear QLoRA).
    lm, _ = model
    lm.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    traces, train_step = [], lm.train_step
    object.__setattr__(lm, "train_step", lambda data: traces.append(1) or train_step(data))
    try:
        x, y = _batch()
        lm.fit(x, y, batch_size=2, epochs=2, verbose=0)
    finally:
        object.__delattr__(lm, "train_step")
    assert len(traces) == 1
    assert len(lm.optimizer.variables) == 2 * len(lm.lora_variables) + 2  # m, v per variable; iterations, lr


def test_train_graph_calls_one_dequantize_function_per_kernel_shape(model):
    # Each dequantization (forward and backward of 14 layers) is one call of a function shared by
    # every layer of its kernel shape, not a copy of its ops: the train step traces faster.
    import tensorflow as tf

    lm, _ = model
    layers = [la for la in lm._flatten_layers() if isinstance(la, qlora._NF4Base)]
    x, _ = _batch()

    @tf.function
    def gradients():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.cast(lm(x, training=True), "float32") ** 2)
        return tape.gradient(loss, lm.lora_variables)

    graph = gradients.get_concrete_function().graph
    called = [op.get_attr("f").name for op in graph.get_operations()
              if op.type in ("PartitionedCall", "StatefulPartitionedCall")]
    shapes = {tuple(la._torch_shape()) for la in layers}
    assert len(called) == 2 * len(layers)
    assert len(set(called)) == len(shapes)
    table_gathers = [op for op in graph.get_operations() if op.type == "GatherV2" and
                     op.inputs[0].shape.as_list() in ([256, 2], [256])]
    assert table_gathers == []


def test_train_step_grappler_options_apply_to_its_calls_only(model, monkeypatch):
    # "auto" on a CPU-only machine: a lighter grappler for the train function's calls, through the call's
    # config_proto; TensorFlow's global optimizer options are never changed. {}: TF's defaults.
    import contextlib

    import tensorflow as tf
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.eager import context

    from tf_lora import _compat

    def disabled():  # the passes "auto" turns off on a CPU-only machine
        config = config_pb2.ConfigProto.FromString(context.context().function_call_options.config_proto_serialized)
        options = config.graph_options.rewrite_options
        return (options.meta_optimizer_iterations, options.memory_optimization) == (1, 1)

    seen, original = [], _compat.graph_rewrites

    @contextlib.contextmanager
    def recording(rewrites):
        with original(rewrites):
            seen.append(disabled())
            yield

    monkeypatch.setattr(_compat, "graph_rewrites", recording)
    lm, _ = model
    x, y = _batch()
    global_options = tf.config.optimizer.get_experimental_options()
    accelerated = any(d.device_type != "CPU" for d in tf.config.list_physical_devices())
    lm.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    lm.fit(x, y, batch_size=2, epochs=1, verbose=0)
    assert seen == ([] if accelerated else [True])
    assert not disabled() and tf.config.optimizer.get_experimental_options() == global_options
    object.__setattr__(lm, "train_graph_rewrites", {})
    try:
        lm.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        lm.fit(x, y, batch_size=2, epochs=1, verbose=0)
    finally:
        object.__delattr__(lm, "train_graph_rewrites")
    assert seen == ([] if accelerated else [True])
    with pytest.raises(ValueError, match="train_graph_rewrites"):
        object.__setattr__(lm, "train_graph_rewrites", "off")
        try:
            lm.make_train_function(force=True)
        finally:
            object.__delattr__(lm, "train_graph_rewrites")
