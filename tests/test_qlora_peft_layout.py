"""QLoRAEinsumDense's NF4 layout: the codes of an attention kernel equal bitsandbytes' for the
equivalent torch ``nn.Linear`` weight (out_features, in_features), and QLoRA import of a PEFT
adapter on attention projections equals PEFT + bitsandbytes.

References: bitsandbytes 0.50.2 itself (`fixtures/peft/llama_qlora/ref_attention.npz`, made by
`fixtures/make_qlora_attention_fixture.py`: its packed codes and `QuantState` per projection, and
PEFT's logits), the Hugging Face weights in the fixtures' ``model.safetensors`` read directly
(not through KerasHub), and `nf4.quantize` on a 2-D (in, out) array, which
`tests/test_nf4.py` checks against bitsandbytes. Storage is compared bit for bit; logits within
`ATOL` = 1e-4, the tolerance of the MLP QLoRA test in `tests/test_peft.py`.
"""

import json
import os
import zipfile

import keras
import keras_hub
import numpy as np
import pytest
from safetensors.numpy import load_file

import tf_lora
from tf_lora import nf4
from tf_lora.layers.lora import LoRALayer
from tf_lora.layers.qlora import QLoRAEinsumDense
from tf_lora.surgery import walk

M = keras_hub.models
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "peft")
ATOL = 1e-4
# KerasHub layer name -> Hugging Face module, per attention projection.
HF_NAME = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "attention_output": "o_proj"}


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def _stored(layer):
    return {v.name[len("nf4_"):]: v.numpy() for v in layer.storage_variables()}


def _assert_storage_is(layer, q):
    stored = _stored(layer)
    assert sorted(stored) == sorted(q.arrays)
    for name, array in q.arrays.items():
        np.testing.assert_array_equal(stored[name], array, err_msg=f"{layer.name}: nf4_{name}")


# Torch weight (out, in) -> KerasHub kernel, written out per layout (as KerasHub's converters do).
H, N, D = 40, 3, 8  # hidden 40: groups of 64 cross the torch weight's rows
KERNEL_FROM_TORCH = {
    # Llama/Qwen/Mistral query/key/value: "bqm,muh->bquh", kernel (hidden, heads, head_dim).
    "llama_qkv": ("bqm,muh->bquh", (None, N, D), (2, 4, H), lambda w: w.reshape(N, D, H).transpose(2, 0, 1)),
    # Gemma query/key/value: "btd,ndh->btnh", kernel (heads, hidden, head_dim).
    "gemma_qkv": ("btd,ndh->btnh", (None, N, D), (2, 4, H), lambda w: w.reshape(N, D, H).transpose(0, 2, 1)),
    # attention_output: "bquh,uhm->bqm", kernel (heads, head_dim, hidden); torch (hidden, heads*head_dim).
    "attention_output": ("bquh,uhm->bqm", (None, H), (2, 4, N, D), lambda w: w.T.reshape(N, D, H)),
    # keras.layers.MultiHeadAttention's query: "abc,cde->abde".
    "keras_mha_qkv": ("abc,cde->abde", (None, N, D), (2, 4, H), lambda w: w.reshape(N, D, H).transpose(2, 0, 1)),
}


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no_dq"])
@pytest.mark.parametrize("kind", sorted(KERNEL_FROM_TORCH))
def test_attention_codes_equal_bitsandbytes_flattening(kind, double_quant):
    equation, output_shape, input_shape, to_kernel = KERNEL_FROM_TORCH[kind]
    torch_shape = (H, N * D) if kind == "attention_output" else (N * D, H)
    weight = _rand(*torch_shape, seed=1)  # torch layout (out, in)
    base = keras.layers.EinsumDense(equation, output_shape)
    base.build(input_shape)
    base.kernel.assign(to_kernel(weight))
    layer = QLoRAEinsumDense.from_layer(base, quantization=tf_lora.QLoRAConfig(double_quant=double_quant), rank=2)
    q = nf4.quantize(weight.T, 64, double_quant)  # bitsandbytes' quantize_4bit(weight) (test_nf4.py)
    _assert_storage_is(layer, q)
    state = nf4.to_bitsandbytes(layer.nf4_tensor())
    assert state["shape"] == torch_shape  # the state of the torch Linear weight, as bitsandbytes stores it
    # The layer computes with that weight dequantized, back in its own layout: bit for bit.
    kernel = to_kernel(nf4.dequantize(q).numpy().T)
    np.testing.assert_array_equal(layer.base_kernel_value(), kernel)
    x = _rand(*input_shape, seed=2)
    expected = np.einsum(equation, x.astype(np.float64), kernel.astype(np.float64))
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-5, atol=1e-5)
    # Fake-quant mode uses the same groups: it computes with the same kernel.
    fake = QLoRAEinsumDense.from_layer(
        base, quantization=tf_lora.QLoRAConfig(double_quant=double_quant, fake_quant=True), rank=2)
    np.testing.assert_array_equal(fake.base_kernel_value(), kernel)
    np.testing.assert_allclose(np.asarray(fake(x)), expected, rtol=1e-5, atol=1e-5)


def test_quantizing_a_variable_reads_slices_that_cut_heads(monkeypatch):
    """`nf4.quantize` reads a variable a few output columns at a time; those slices cut through
    heads here (chunk of 16 elements, head_dim 8, hidden 40), and still give the whole array's codes."""
    monkeypatch.setattr(nf4, "_CHUNK", 16)
    equation, output_shape, input_shape, to_kernel = KERNEL_FROM_TORCH["gemma_qkv"]
    weight = _rand(N * D, H, seed=3)
    base = keras.layers.EinsumDense(equation, output_shape)
    base.build(input_shape)
    base.kernel.assign(to_kernel(weight))
    layer = QLoRAEinsumDense.from_layer(base, quantization=tf_lora.QLoRAConfig(group_size=16), rank=2)
    _assert_storage_is(layer, nf4.quantize(weight.T, 16, True))


def _llama_qlora():
    return M.Llama3CausalLM(M.Llama3Backbone.from_preset(os.path.join(FIXTURES, "llama_qlora", "base")),
                            preprocessor=None)


def test_kerashub_attention_codes_equal_bitsandbytes_fixture():
    """The codes of KerasHub's converted Llama attention kernels equal those bitsandbytes made
    (transformers + `BitsAndBytesConfig(load_in_4bit, nf4, double quant)`) for q/k/v/o_proj."""
    ref = np.load(os.path.join(FIXTURES, "llama_qlora", "ref_attention.npz"))
    backbone = _llama_qlora().backbone
    denses = {l.name: l for _, l, _ in walk(backbone) if isinstance(l, keras.layers.EinsumDense)}
    assert sorted(denses) == sorted(HF_NAME)  # one block
    for name, hf in HF_NAME.items():
        layer = QLoRAEinsumDense.from_layer(denses[name], quantization=tf_lora.QLoRAConfig(), rank=2)
        key = f"model.layers.0.self_attn.{hf}"
        bnb = {k.split("__", 1)[1]: ref[k] for k in ref.files if k.startswith(key + "__")}
        theirs = nf4.from_bitsandbytes(bnb)  # bitsandbytes' state, not requantized
        assert theirs.shape[::-1] == tuple(bnb["shape"])
        _assert_storage_is(layer, theirs)


@pytest.mark.parametrize("arch,backbone", [("gemma", M.GemmaBackbone), ("llama", M.Llama3Backbone)])
def test_every_attention_projection_codes_equal_hugging_face_weight_quantized(arch, backbone):
    """Gemma's kernels (heads, hidden, head_dim) and Llama's (hidden, heads, head_dim), hidden 32:
    each group of 64 spans two rows of the Hugging Face weight read from model.safetensors."""
    hf = load_file(os.path.join(FIXTURES, arch, "base", "model.safetensors"))
    lm = backbone.from_preset(os.path.join(FIXTURES, arch, "base"))
    model = tf_lora.adapt(lm, tf_lora.LoRAConfig(rank=2, target_modules=tuple(HF_NAME),
                                                 quantization=tf_lora.QLoRAConfig()))
    checked = 0
    for path, layer, _ in walk(model):
        if isinstance(layer, QLoRAEinsumDense):
            block = int(path.split("/")[0].rsplit("_", 1)[1])
            weight = hf[f"model.layers.{block}.self_attn.{HF_NAME[layer.name]}.weight"]
            _assert_storage_is(layer, nf4.quantize(weight.T, 64, True))
            checked += 1
    assert checked == 8


def _logits(model, tokens):
    return np.asarray(model({"token_ids": tokens, "padding_mask": np.ones_like(tokens)}))


def test_from_peft_attention_only_qlora_equals_peft_with_bitsandbytes(tmp_path):
    ref = np.load(os.path.join(FIXTURES, "llama_qlora", "ref_attention.npz"))
    directory = os.path.join(FIXTURES, "llama_qlora", "adapter_attention")
    lm = _llama_qlora()
    model = tf_lora.from_peft(lm, directory, quantization=tf_lora.QLoRAConfig())
    adapted = {p: l for p, l, _ in walk(model) if isinstance(l, LoRALayer)}
    assert sorted(l.name for l in adapted.values()) == sorted(HF_NAME)
    assert all(isinstance(l, QLoRAEinsumDense) for l in adapted.values())
    diff = np.max(np.abs(_logits(model, ref["tokens"]) - ref["peft_logits"]))
    assert diff <= ATOL, diff
    # Quantization matters at this size: the float import is far off.
    float_model = tf_lora.from_peft(lm, directory)
    assert np.max(np.abs(_logits(float_model, ref["tokens"]) - ref["peft_logits"])) > 0.02
    # Export: the QLoRA model saves PEFT's adapter back unchanged (same keys, equal tensors).
    tf_lora.save_adapter(model, str(tmp_path / "out"), format="peft")
    original = load_file(os.path.join(directory, "adapter_model.safetensors"))
    exported = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


# -- layers saved before the linear layout ------------------------------------------------------------------
def _mha_like_model(seed=0):
    inputs = keras.Input((4, H))
    h = keras.layers.EinsumDense("btd,ndh->btnh", (None, N, D), name="query")(inputs)
    out = keras.layers.EinsumDense("btnh,nhd->btd", (None, H), name="attention_output")(h)
    model = keras.Model(inputs, out)
    for i, v in enumerate(model.weights):
        v.assign(_rand(*v.shape, seed=seed + i))
    return model


def _without_layout_key(path, out_path):
    """The .keras file at `path` as an older tf_lora wrote it: configs without `nf4_layout`."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out_path, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "config.json":
                text = data.decode()
                assert text.count('"nf4_layout": "last_axis_first"') == 2
                data = text.replace(', "nf4_layout": "last_axis_first"', "").encode()
                assert "nf4_layout" not in data.decode()
            dst.writestr(item, data)


def test_old_layout_files_keep_loading(tmp_path):
    base = _mha_like_model()
    config = tf_lora.LoRAConfig(rank=2, target_modules=("query", "attention_output"),
                                quantization=tf_lora.QLoRAConfig(group_size=16))
    model = tf_lora.adapt(base, config)
    x = _rand(2, 4, H, seed=9)
    # An old layer: groups over the kernel with its last axis first (what QLoRAEinsumDense stored before).
    old = {}
    for name in ("query", "attention_output"):
        layer = model.get_layer(name)
        cfg = {**layer.get_config(), "nf4_layout": "last_axis_first"}
        old[name] = QLoRAEinsumDense.from_config(cfg)
        old[name].build(layer._built_shape)
        old[name]._copy_base_weights(base.get_layer(name))
        _assert_storage_is(old[name], nf4.quantize(base.get_layer(name).kernel.numpy(), 16, True))
    # A model of old layers saved, then its config stripped of the key, as older versions wrote it.
    inputs = keras.Input((4, H))
    old_model = keras.Model(inputs, old["attention_output"](old["query"](inputs)))
    path, stripped = str(tmp_path / "new.keras"), str(tmp_path / "old.keras")
    old_model.save(path)
    _without_layout_key(path, stripped)
    loaded = keras.models.load_model(stripped)
    for name in ("query", "attention_output"):
        restored = loaded.get_layer(name)
        assert restored.nf4_layout == "last_axis_first"
        _assert_storage_is(restored, old[name].nf4_tensor())
        np.testing.assert_array_equal(restored.base_kernel_value(), old[name].base_kernel_value())
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(old_model(x)), rtol=1e-6, atol=1e-6)
    # Both layouts hold the float kernel up to NF4 rounding, of different groups: each element within
    # half the widest gap between NF4 codes (0.1385) times its group's absmax (<= the kernel's).
    half_gap = np.max(np.diff(nf4.CODEBOOK)) / 2
    for name in ("query", "attention_output"):
        kernel = base.get_layer(name).kernel.numpy()
        new_kernel, old_kernel = model.get_layer(name).base_kernel_value(), old[name].base_kernel_value()
        # attention_output (heads, head_dim, hidden): its last axis first already was (hidden, heads * head_dim).
        assert np.array_equal(new_kernel, old_kernel) == (name == "attention_output")
        for value in (new_kernel, old_kernel):
            assert np.max(np.abs(value - kernel)) <= half_gap * np.max(np.abs(kernel)) * (1 + 1e-3)


def test_linear_layout_keras_round_trip(tmp_path):
    model = tf_lora.adapt(_mha_like_model(), tf_lora.LoRAConfig(
        rank=2, target_modules=("query", "attention_output"), quantization=tf_lora.QLoRAConfig(group_size=16)))
    path = str(tmp_path / "linear.keras")
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        assert json.loads(archive.read("config.json")).__repr__().count("'nf4_layout': 'linear'") == 2
    loaded = keras.models.load_model(path)
    x = _rand(2, 4, H, seed=4)
    for name in ("query", "attention_output"):
        assert loaded.get_layer(name).nf4_layout == "linear"
        _assert_storage_is(loaded.get_layer(name), model.get_layer(name).nf4_tensor())
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("value", ["torch", "", None], ids=["unknown", "empty", "none"])
def test_bad_nf4_layout(value):
    with pytest.raises(ValueError, match="nf4_layout"):
        QLoRAEinsumDense("btd,ndh->btnh", (None, N, D), nf4_layout=value)
