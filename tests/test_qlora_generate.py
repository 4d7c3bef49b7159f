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
