"""The PEFT bridge (tf_lora.interop.peft) against the real peer.

Fixtures (tests/fixtures/peft/, made by make_peft_fixtures.py with torch 2.13.0+cpu,
transformers 5.24.0, peft 0.21.2, bitsandbytes 0.50.2): tiny random Hugging Face checkpoints, PEFT adapters
with random non-zero A and B, and PEFT's outputs. KerasHub reads the checkpoints offline
with ``from_preset(dir)``; no torch is needed except for the live tests at the end,
which skip without it.

Tolerances (float32): outputs vs Hugging Face / PEFT 1e-4 (measured: ~1e-6 for the
base checkpoints, <= 3e-5 with adapters; modules_to_save: ~1e-6 for the LM head in and out, tied
or not, and BERT's pooler); adapter weights exported after import equal
PEFT's bit for bit (only reshapes and transposes happen).
"""

import json
import os
import shutil

import keras
import keras_hub
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import tf_lora
from tf_lora.interop import peft as tf_peft
from tf_lora.layers.embedding import LoRAReversibleEmbedding
from tf_lora.layers.lora import LoRALayer, _einsum_lora_equations
from tf_lora.surgery import walk

M = keras_hub.models
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "peft")
ARCHS = ["llama", "qwen2", "gemma", "mistral", "bert"]
DECODERS = [a for a in ARCHS if a != "bert"]
BACKBONE = {"llama": M.Llama3Backbone, "qwen2": M.QwenBackbone, "gemma": M.GemmaBackbone,
            "mistral": M.MistralBackbone, "bert": M.BertBackbone}
CAUSAL_LM = {"llama": M.Llama3CausalLM, "qwen2": M.QwenCausalLM, "gemma": M.GemmaCausalLM, "mistral": M.MistralCausalLM}
ATOL = 1e-4

_LLAMA = ["self_attention/query", "self_attention/key", "self_attention/value", "self_attention/attention_output",
          "feedforward_gate_dense", "feedforward_intermediate_dense", "feedforward_output_dense"]
_GEMMA = ["attention/query", "attention/key", "attention/value", "attention/attention_output",
          "ffw_gating", "ffw_gating_2", "ffw_linear"]
_BERT = ["self_attention_layer/query", "self_attention_layer/key", "self_attention_layer/value",
         "self_attention_layer/attention_output", "feedforward_intermediate_dense", "feedforward_output_dense"]
# The layers each fixture adapter targets, written out by hand (an independent check of the tables).
EXPECTED = {
    "llama": [f"transformer_layer_{i}/{p}" for i in (0, 1) for p in _LLAMA],
    "qwen2": [f"transformer_layer_1/{p}" for p in _LLAMA],  # layers_to_transform=[1]
    "gemma": [f"decoder_block_{i}/{p}" for i in (0, 1) for p in _GEMMA],
    "mistral": [f"transformer_layer_{i}/self_attention/{p}" for i in (0, 1) for p in ("query", "value")]
    + [f"transformer_layer_{i}/feedforward_output_dense" for i in (0, 1)],
    "bert": [f"transformer_layer_{i}/{p}" for i in (0, 1) for p in _BERT] + ["pooled_dense"],
}


def _dir(arch, *parts):
    return os.path.join(FIXTURES, arch, *parts)


def _ref(arch):
    return np.load(_dir(arch, "ref.npz"))


def _backbone(arch):
    return BACKBONE[arch].from_preset(_dir(arch, "base"))


def _inputs(arch, tokens):
    x = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}
    if arch == "bert":
        x["segment_ids"] = np.zeros_like(tokens)
    return x


def _outputs(arch, model, tokens):
    """{name: array} comparable with the fixture's ``base_*`` / ``peft_*`` entries."""
    out = model(_inputs(arch, tokens), training=False)
    if arch == "bert":
        return {"hidden": np.asarray(out["sequence_output"]), "pooled": np.asarray(out["pooled_output"])}
    if isinstance(model, M.CausalLM):
        return {"logits": np.asarray(out)}
    return {"hidden": np.asarray(out)}


def _max_diff(arch, model, ref, kind):
    out = _outputs(arch, model, ref["tokens"])
    return {k: float(np.max(np.abs(v - ref[f"{kind}_{k}"]))) for k, v in out.items()}


def _adapter_paths(model):
    return sorted(p for p, layer, _ in walk(model) if isinstance(layer, LoRALayer))


def _snapshot(model):
    return [v.numpy().copy() for v in model.weights]


def _copy_adapter(arch, tmp_path, name="adapter"):
    out = tmp_path / name
    shutil.copytree(_dir(arch, "adapter"), out)
    return out


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# -- the base checkpoints and the name tables ----------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_kerashub_base_equals_hugging_face(arch):
    """First the base: a mismatch later is then the adapter's, not the checkpoint conversion's."""
    diffs = _max_diff(arch, _backbone(arch), _ref(arch), "base")
    assert max(diffs.values()) <= ATOL, diffs


@pytest.mark.parametrize("arch", ARCHS)
def test_name_table_rows_and_layout_match_the_converter(arch):
    """Every row of the table names a layer whose kernel KerasHub's converter filled with the
    row's Hugging Face weight laid out as tf_lora.interop.peft assumes (W.T reshaped to the
    input-side then output-side kernel axes, then in the kernel's own order)."""
    backbone = _backbone(arch)
    nmap, _, prefix = tf_peft.architecture(backbone)
    assert prefix == ""
    layers = {p: l for p, l, _ in walk(backbone)}
    hf = load_file(_dir(arch, "base", "model.safetensors"))
    hf_prefix = "" if arch == "bert" else "model."
    names = tf_peft.module_names(nmap, backbone.num_layers)
    assert len(names) == backbone.num_layers * len(nmap.blocks) + len(nmap.top) + len(nmap.embeddings)
    for module, path in names.items():
        layer = layers[path]
        if module in nmap.embeddings:  # an Embedding's (vocab, dim) weight is the table as it is
            np.testing.assert_array_equal(layer.embeddings.numpy(), hf[hf_prefix + module + ".weight"], err_msg=module)
            assert tf_peft._lora_shapes(layer) == ((layer.input_dim,), (layer.output_dim,))
            continue
        in_shape, out_shape = tf_peft._lora_shapes(layer)
        kernel = hf[hf_prefix + module + ".weight"].T.reshape(in_shape + out_shape)
        if isinstance(layer, keras.layers.EinsumDense):
            _, _, _, in_axes, out_axes = _einsum_lora_equations(layer.equation)
            k_sub = layer.equation.split("->")[0].split(",")[1]
            kernel = np.transpose(kernel, [(in_axes + out_axes).index(c) for c in k_sub])
        np.testing.assert_array_equal(layer.kernel.numpy(), kernel, err_msg=f"{module} -> {path}")


# -- import ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_from_peft_equals_peft_on_the_backbone(arch):
    ref, base = _ref(arch), _backbone(arch)
    before = _snapshot(base)
    model = tf_lora.from_peft(base, _dir(arch, "adapter"))
    assert isinstance(model, type(base)) and isinstance(model, tf_lora.AdaptedModel)
    assert _adapter_paths(model) == sorted(EXPECTED[arch])
    diffs = _max_diff(arch, model, ref, "peft")
    assert max(diffs.values()) <= ATOL, diffs
    # The adapter matters: PEFT's outputs are far from the base's.
    assert max(_max_diff(arch, model, ref, "base").values()) > 0.1
    # The base is untouched.
    assert not _adapter_paths(base)
    for w, v in zip(before, base.weights):
        np.testing.assert_array_equal(w, v.numpy())


def test_ranks_and_alphas_follow_rank_pattern_and_alpha_pattern():
    model = tf_lora.from_peft(_backbone("gemma"), _dir("gemma", "adapter"))
    layers = {p: l for p, l, _ in walk(model) if isinstance(l, LoRALayer)}
    for path, layer in layers.items():
        rank = 2 if path.endswith("/query") else 6 if path == "decoder_block_1/ffw_linear" else 4
        alpha = 3.0 if path.endswith("/attention_output") else 8.0
        assert (layer.rank, layer.alpha, layer.use_rslora) == (rank, alpha, False), path
    qwen = tf_lora.from_peft(_backbone("qwen2"), _dir("qwen2", "adapter"))
    assert all(l.use_rslora and l.scaling == pytest.approx(8 / 2) for _, l, _ in walk(qwen) if isinstance(l, LoRALayer))


@pytest.mark.parametrize("arch", DECODERS)
def test_from_peft_equals_peft_on_the_causal_lm(arch):
    ref = _ref(arch)
    base = CAUSAL_LM[arch](_backbone(arch), preprocessor=None)
    model = tf_lora.from_peft(base, _dir(arch, "adapter"))
    assert isinstance(model, type(base)) and isinstance(model, tf_lora.AdaptedModel)
    backbone_name = model.backbone.name
    assert _adapter_paths(model) == sorted(f"{backbone_name}/{p}" for p in EXPECTED[arch])
    diffs = _max_diff(arch, model, ref, "peft")
    assert diffs["logits"] <= ATOL, diffs


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_greedy_generate_gives_peft_tokens(arch):
    ref = _ref(arch)
    model = tf_lora.from_peft(CAUSAL_LM[arch](_backbone(arch), preprocessor=None), _dir(arch, "adapter"), inplace=True)
    model.compile(sampler="greedy")
    tokens = ref["peft_greedy"]
    prompt = np.zeros((1, len(tokens)), "int32")
    prompt[0, :3] = tokens[:3]
    mask = (np.arange(len(tokens)) < 3)[None].astype("int32")
    out = model.generate({"token_ids": prompt, "padding_mask": mask}, stop_token_ids=None)
    assert not np.array_equal(ref["base_greedy"], tokens)  # the adapter changes the generation
    np.testing.assert_array_equal(np.asarray(out["token_ids"])[0], tokens)


def test_inplace_adapts_the_model_itself():
    base = _backbone("llama")
    model = tf_lora.from_peft(base, _dir("llama", "adapter"), inplace=True)
    assert model is base and _adapter_paths(base) == sorted(EXPECTED["llama"])
    assert max(_max_diff("llama", base, _ref("llama"), "peft").values()) <= ATOL


def test_keys_of_a_bare_base_model_load_too(tmp_path):
    """Keys saved from LlamaModel (``base_model.model.layers...``), not LlamaForCausalLM."""
    directory = _copy_adapter("llama", tmp_path)
    weights = load_file(str(directory / "adapter_model.safetensors"))
    save_file({k.replace("base_model.model.model.", "base_model.model."): v for k, v in weights.items()},
              str(directory / "adapter_model.safetensors"))
    targets = json.loads((directory / "adapter_config.json").read_text())["target_modules"]
    _edit_config(directory, target_modules=[t.replace("model.", "", 1) for t in targets])
    model = tf_lora.from_peft(_backbone("llama"), str(directory))
    assert max(_max_diff("llama", model, _ref("llama"), "peft").values()) <= ATOL


def test_load_adapter_reads_a_peft_directory(tmp_path):
    model = tf_lora.from_peft(_backbone("llama"), _dir("llama", "adapter"))
    expected = _outputs("llama", model, _ref("llama")["tokens"])["hidden"]
    for v in model.trainable_variables:
        v.assign(np.zeros(v.shape, "float32"))
    tf_lora.load_adapter(model, _dir("llama", "adapter"))
    np.testing.assert_array_equal(_outputs("llama", model, _ref("llama")["tokens"])["hidden"], expected)
    # Another adapter's targets / ranks do not fit: nothing changes.
    other = _copy_adapter("llama", tmp_path)
    _edit_config(other, r=2, target_modules=["q_proj"])
    before = _snapshot(model)
    with pytest.raises(ValueError, match="holds weights for|targets other layers|shapes"):
        tf_lora.load_adapter(model, str(other))
    for w, v in zip(before, model.weights):
        np.testing.assert_array_equal(w, v.numpy())


def test_qlora_from_peft_reproduces_peft_with_bitsandbytes_nf4():
    """PEFT + bitsandbytes NF4 (blocksize 64, double quantization) on the MLP projections
    (attention projections: tests/test_qlora_peft_layout.py)."""
    ref = np.load(_dir("llama_qlora", "ref.npz"))
    lm = M.Llama3CausalLM(M.Llama3Backbone.from_preset(_dir("llama_qlora", "base")), preprocessor=None)
    x = _inputs("llama", ref["tokens"])
    model = tf_lora.from_peft(lm, _dir("llama_qlora", "adapter"), quantization=tf_lora.QLoRAConfig())
    adapted = [l for _, l, _ in walk(model) if isinstance(l, LoRALayer)]
    assert len(adapted) == 3 and all(isinstance(l, tf_lora.QLoRADense) for l in adapted)
    assert np.max(np.abs(np.asarray(model(x)) - ref["peft_logits"])) <= ATOL
    # Quantization matters at this size: the float adapter is far off.
    float_model = tf_lora.from_peft(lm, _dir("llama_qlora", "adapter"))
    assert np.max(np.abs(np.asarray(float_model(x)) - ref["peft_logits"])) > 0.05
    with pytest.raises(TypeError, match="quantization"):
        tf_lora.from_peft(lm, _dir("llama_qlora", "adapter"), quantization={"bits": 4})


# -- modules_to_save: the LM head (a KerasHub ReversibleEmbedding) and BERT's pooler ------------------------
def _lm_head_ref():
    return np.load(_dir("llama", "ref_lm_head.npz"))


def test_modules_to_save_lm_head_equals_peft_on_the_causal_lm():
    """PEFT's `modules_to_save=["lm_head"]` (saved as ``base_model.model.lm_head.weight``) on an
    untied Llama is KerasHub's ``token_embedding.reverse_embeddings`` (transposed)."""
    ref, lm = _lm_head_ref(), CAUSAL_LM["llama"](_backbone("llama"), preprocessor=None)
    base_logits = np.asarray(lm(_inputs("llama", ref["tokens"])))
    model = tf_lora.from_peft(lm, _dir("llama", "adapter_lm_head"))
    logits = np.asarray(model(_inputs("llama", ref["tokens"])))
    assert np.max(np.abs(logits - ref["peft_logits"])) <= ATOL
    assert np.max(np.abs(base_logits - ref["peft_logits"])) > 0.1
    assert model.modules_to_save_layers() == [model.backbone.token_embedding]
    assert {v.path for v in model.lora_variables} >= {"token_embedding/embeddings", "token_embedding/reverse_embeddings"}
    # The input table is the base's (PEFT saved only the head); the file's head is the reverse table.
    head = load_file(_dir("llama", "adapter_lm_head", "adapter_model.safetensors"))["base_model.model.lm_head.weight"]
    np.testing.assert_array_equal(model.backbone.token_embedding.reverse_embeddings.numpy(), head.T)
    np.testing.assert_array_equal(model.backbone.token_embedding.embeddings.numpy(),
                                  lm.backbone.token_embedding.embeddings.numpy())


def test_modules_to_save_lm_head_loads_into_the_backbone_too():
    ref = _lm_head_ref()
    model = tf_lora.from_peft(_backbone("llama"), _dir("llama", "adapter_lm_head"))
    assert np.max(np.abs(_outputs("llama", model, ref["tokens"])["hidden"] - ref["peft_hidden"])) <= ATOL


def test_modules_to_save_export_writes_the_head_and_the_input_table(tmp_path):
    """The token embedding is PEFT's embed_tokens and lm_head at once: both are written, the
    head bit for bit as PEFT saved it, and the directory loads back to the same model."""
    model = tf_lora.from_peft(CAUSAL_LM["llama"](_backbone("llama"), preprocessor=None), _dir("llama", "adapter_lm_head"))
    tf_lora.save_adapter(model, str(tmp_path / "out"), format="peft")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["embed_tokens", "lm_head"]
    original = load_file(_dir("llama", "adapter_lm_head", "adapter_model.safetensors"))
    exported = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert sorted(exported) == sorted([*original, "base_model.model.model.embed_tokens.weight"])
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    base = load_file(_dir("llama", "base", "model.safetensors"))["model.embed_tokens.weight"]
    np.testing.assert_array_equal(exported["base_model.model.model.embed_tokens.weight"], base)
    tokens = _lm_head_ref()["tokens"]
    again = tf_lora.from_peft(CAUSAL_LM["llama"](_backbone("llama"), preprocessor=None), str(tmp_path / "out"))
    np.testing.assert_array_equal(np.asarray(again(_inputs("llama", tokens))), np.asarray(model(_inputs("llama", tokens))))
    # load_adapter reads it into the adapted model; an adapter without the head does not fit.
    tf_lora.load_adapter(again, str(tmp_path / "out"))
    headless = tmp_path / "headless"
    shutil.copytree(_dir("llama", "adapter_lm_head"), headless)
    _edit_config(headless, modules_to_save=None)
    _rewrite_keys(headless, lambda t: ((k, v) for k, v in t.items() if "lm_head" not in k))
    with pytest.raises(ValueError, match="modules_to_save"):
        tf_lora.load_adapter(again, str(headless))


def _with_head(directory, head):
    _edit_config(directory, modules_to_save=["lm_head"])
    _rewrite_keys(directory, lambda t: {**t, "base_model.model.lm_head.weight": head}.items())


def test_modules_to_save_on_a_tied_embedding(tmp_path):
    """Qwen2 here ties the LM head to the input embedding (KerasHub: one `embeddings` table).
    PEFT trains a copy of the head, untied: only a head equal to the table maps, else
    NotImplementedError naming the field; the model is unchanged either way."""
    table = load_file(_dir("qwen2", "base", "model.safetensors"))["model.embed_tokens.weight"]
    same = _copy_adapter("qwen2", tmp_path, "same")
    _with_head(same, table)
    model = tf_lora.from_peft(_backbone("qwen2"), str(same))
    assert max(_max_diff("qwen2", model, _ref("qwen2"), "peft").values()) <= ATOL
    other = _copy_adapter("qwen2", tmp_path, "other")
    _with_head(other, table + 0.01)
    base = _backbone("qwen2")
    before = _snapshot(base)
    with pytest.raises(NotImplementedError, match="modules_to_save.*tie"):
        tf_lora.from_peft(base, str(other), inplace=True)
    assert not isinstance(base, tf_lora.AdaptedModel)
    for w, v in zip(before, base.weights):
        np.testing.assert_array_equal(w, v.numpy())


# -- export ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_save_adapter_peft_writes_what_peft_wrote(arch, tmp_path):
    """Import then export: the same keys and the same tensors bit for bit, and a config
    that targets the same modules with the same ranks, alphas and rsLoRA."""
    model = tf_lora.from_peft(_backbone(arch), _dir(arch, "adapter"))
    out = tmp_path / "exported"
    size = tf_lora.save_adapter(model, str(out), format="peft", base_model_name_or_path=_dir(arch, "base"))
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert size == sum(os.path.getsize(out / f) for f in os.listdir(out))
    original, exported = load_file(_dir(arch, "adapter", "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        assert exported[key].dtype == np.float32
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["bias"] == "none"
    assert config["base_model_name_or_path"] == _dir(arch, "base")
    assert config["task_type"] == ("FEATURE_EXTRACTION" if arch == "bert" else "CAUSAL_LM")
    # Same model again from the exported directory.
    again = tf_lora.from_peft(_backbone(arch), str(out))
    assert _adapter_paths(again) == _adapter_paths(model)
    for k, v in _outputs(arch, again, _ref(arch)["tokens"]).items():
        np.testing.assert_allclose(v, _outputs(arch, model, _ref(arch)["tokens"])[k], atol=1e-6)


def test_export_names_bert_pooler_and_causal_lm_keys(tmp_path):
    """A tf_lora-made adapter: BERT's pooled_dense is pooler.dense under "all-linear"; a
    decoder Backbone exports with its CausalLM keys."""
    bert = tf_lora.adapt(_backbone("bert"), tf_lora.LoRAConfig(rank=2, target_modules="all-linear"))
    tf_lora.save_adapter(bert, str(tmp_path / "bert"), format="peft")
    keys = load_file(str(tmp_path / "bert" / "adapter_model.safetensors"))
    assert "base_model.model.pooler.dense.lora_A.weight" in keys
    config = json.loads((tmp_path / "bert" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["dense", "key", "query", "value"]
    llama = tf_lora.adapt(_backbone("llama"), tf_lora.LoRAConfig(rank=2, target_modules=("query",)))
    tf_lora.save_adapter(llama, str(tmp_path / "llama"), format="peft")
    keys = sorted(load_file(str(tmp_path / "llama" / "adapter_model.safetensors")))
    assert keys[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" and len(keys) == 4
    assert json.loads((tmp_path / "llama" / "adapter_config.json").read_text())["target_modules"] == ["q_proj"]


def test_export_of_an_unmapped_layer_fails_and_writes_nothing(tmp_path):
    classifier = M.BertTextClassifier(_backbone("bert"), num_classes=2, preprocessor=None)
    model = tf_lora.adapt(classifier, tf_lora.LoRAConfig(rank=2, target_modules="all-linear"))
    with pytest.raises(ValueError, match="no Hugging Face name"):
        tf_lora.save_adapter(model, str(tmp_path / "new"), format="peft")
    assert not (tmp_path / "new").exists()
    existing = _copy_adapter("bert", tmp_path, "existing")
    before = {f: (existing / f).read_bytes() for f in os.listdir(existing)}
    with pytest.raises(ValueError, match="no Hugging Face name"):
        tf_lora.save_adapter(model, str(existing), format="peft")
    assert {f: (existing / f).read_bytes() for f in os.listdir(existing)} == before
    with pytest.raises(ValueError, match="format"):
        tf_lora.save_adapter(model, str(tmp_path / "x"), format="onnx")


# -- bad input: a clear error, and the model unchanged ----------------------------------------------------------
def _weights(directory):
    return directory / "adapter_model.safetensors"


def _rewrite_keys(directory, fn):
    tensors = load_file(str(_weights(directory)))
    save_file(dict(fn(tensors)), str(_weights(directory)))


BAD = {
    "use_dora_without_magnitudes": (lambda d: _edit_config(d, use_dora=True), ValueError, "lora_magnitude_vector.*use_dora"),
    "lora_bias": (lambda d: _edit_config(d, lora_bias=True), NotImplementedError, "lora_bias"),
    "pissa_init": (lambda d: _edit_config(d, init_lora_weights="pissa"), NotImplementedError, "init_lora_weights"),
    "modules_to_save_without_weights": (lambda d: _edit_config(d, modules_to_save=["lm_head"]), ValueError,
                                        "modules_to_save"),
    "modules_to_save_unmapped": (lambda d: (_edit_config(d, modules_to_save=["score"]), _rewrite_keys(
        d, lambda t: {**t, "base_model.model.score.weight": np.zeros((2, 32), "float32")}.items())),
        NotImplementedError, "modules_to_save"),
    "modules_to_save_shape": (lambda d: (_edit_config(d, modules_to_save=["lm_head"]), _rewrite_keys(
        d, lambda t: {**t, "base_model.model.lm_head.weight": np.zeros((63, 32), "float32")}.items())),
        ValueError, "lm_head"),
    "nan_weight": (lambda d: _rewrite_keys(d, lambda t: ((k, v * np.nan if "layers.1.mlp.up_proj.lora_B" in k else v)
                                                         for k, v in t.items())), ValueError, "NaN"),
    "unknown_feature": (lambda d: _edit_config(d, use_something_new=True), NotImplementedError, "use_something_new"),
    "embedding_target_without_weights": (lambda d: _edit_config(d, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]), ValueError,
        "targets \\['model.embed_tokens'\\] but .* holds no weights"),
    "embedding_key_untargeted": (lambda d: _rewrite_keys(d, lambda t: {
        **t, "base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((4, 64), "float32"),
        "base_model.model.model.embed_tokens.lora_embedding_B": np.zeros((32, 4), "float32")}.items()),
        ValueError, "does not target"),
    "peft_type": (lambda d: _edit_config(d, peft_type="IA3"), ValueError, "peft_type"),
    "r_wrong_type": (lambda d: _edit_config(d, r=[4]), ValueError, "'r' is \\[4\\], expected a positive integer"),
    "header_not_an_object": (lambda d: _weights(d).write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00[]"), ValueError,
                             "header is a JSON list"),
    "no_config": (lambda d: os.remove(d / "adapter_config.json"), ValueError, "adapter_config.json"),
    "bad_json": (lambda d: (d / "adapter_config.json").write_text("{not json"), ValueError, "adapter_config.json"),
    "layer_the_model_lacks": (lambda d: _rewrite_keys(d, lambda t: ((k.replace("layers.1.", "layers.7."), v)
                                                                    for k, v in t.items())),
                              ValueError, "layers.7"),
    "untargeted_key": (lambda d: _edit_config(d, target_modules=["q_proj", "k_proj"]), ValueError, "does not target"),
    "shape_mismatch": (lambda d: _edit_config(d, r=2), ValueError, "shapes"),
    "other_architecture": (lambda d: (shutil.rmtree(d), shutil.copytree(_dir("bert", "adapter"), d)), ValueError,
                           "encoder.layer"),
    "truncated": (lambda d: _weights(d).write_bytes(_weights(d).read_bytes()[:-100]), ValueError, "truncated"),
    "pickle_only": (lambda d: (os.remove(_weights(d)), (d / "adapter_model.bin").write_bytes(b"\x80\x04.")), ValueError,
                    "pickle"),
}


EMBED_BAD = {
    "embedding_only_A": (lambda t: {k: v for k, v in t.items() if "lora_embedding_B" not in k}, ValueError,
                         "lora_embedding_B"),
    "embedding_linear_keys": (lambda t: {k.replace("lora_embedding_A", "lora_A.weight").replace(
        "lora_embedding_B", "lora_B.weight"): v for k, v in t.items()}, ValueError, "expected \\['lora_embedding_A'"),
    "embedding_shape": (lambda t: {**t, "base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((4, 63), "float32")},
                        ValueError, "shapes"),
    "embedding_other_base_table": (lambda t: {**t, "base_model.model.model.embed_tokens.base_layer.weight": t[
        "base_model.model.model.embed_tokens.base_layer.weight"] + 1}, ValueError, "base_layer.weight"),
}


@pytest.mark.parametrize("case", list(EMBED_BAD), ids=list(EMBED_BAD))
def test_bad_embedding_adapter_raises_and_leaves_the_model_unchanged(case, llama_backbone, tmp_path):
    edit, error, match = EMBED_BAD[case]
    directory = tmp_path / "adapter_embed"
    shutil.copytree(_dir("llama", "adapter_embed"), directory)
    _rewrite_keys(directory, lambda t: edit(t).items())
    before = _snapshot(llama_backbone)
    with pytest.raises(error, match=match):
        tf_lora.from_peft(llama_backbone, str(directory), inplace=True)
    assert not _adapter_paths(llama_backbone) and not isinstance(llama_backbone, tf_lora.AdaptedModel)
    for w, v in zip(before, llama_backbone.weights):
        np.testing.assert_array_equal(w, v.numpy())


@pytest.fixture(scope="module")
def llama_backbone():
    return _backbone("llama")


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_raises_and_leaves_the_model_unchanged(case, llama_backbone, tmp_path):
    mutate, error, match = BAD[case]
    directory = _copy_adapter("llama", tmp_path)
    mutate(directory)
    before = _snapshot(llama_backbone)
    with pytest.raises(error, match=match):
        tf_lora.from_peft(llama_backbone, str(directory), inplace=True)
    assert not _adapter_paths(llama_backbone) and not isinstance(llama_backbone, tf_lora.AdaptedModel)
    for w, v in zip(before, llama_backbone.weights):
        np.testing.assert_array_equal(w, v.numpy())


def test_unsupported_architecture_is_not_implemented():
    opt = M.OPTBackbone(vocabulary_size=32, num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=16,
                        max_sequence_length=16)
    with pytest.raises(NotImplementedError, match="OPTBackbone"):
        tf_lora.from_peft(opt, _dir("llama", "adapter"))


# -- live: PEFT itself loads what tf_lora writes ------------------------------------------------------------
def _hf_model(arch):
    transformers = pytest.importorskip("transformers", reason="the live PEFT tests need transformers")
    cls = transformers.BertModel if arch == "bert" else transformers.AutoModelForCausalLM
    model = cls.from_pretrained(_dir(arch, "base"), attn_implementation="eager")
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_loads_a_tf_lora_adapter_with_no_missing_or_unexpected_keys(arch, tmp_path):
    pytest.importorskip("torch", reason="the live PEFT tests need torch")
    peft = pytest.importorskip("peft", reason="the live PEFT tests need peft")

    config = tf_lora.LoRAConfig(rank=3, alpha=5, dropout=0.0, target_modules="all-linear",
                                rank_pattern={"query": 2}, alpha_pattern={"value": 7})
    model = tf_lora.adapt(_backbone(arch), config)
    rng = np.random.default_rng(0)
    for v in model.trainable_variables:
        v.assign(rng.normal(0, 0.2, v.shape).astype("float32"))
    tf_lora.save_adapter(model, str(tmp_path / "adapter"), format="peft")

    hf = _hf_model(arch)
    peft_config = peft.LoraConfig.from_pretrained(str(tmp_path / "adapter"))
    peft_model = peft.get_peft_model(hf, peft_config)
    result = peft.set_peft_model_state_dict(peft_model, peft.utils.load_peft_weights(str(tmp_path / "adapter")))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    peft_model.eval()

    tokens = _ref(arch)["tokens"]
    ours = _outputs(arch, model, tokens)
    # And through PEFT's own loading path.
    loaded = peft.PeftModel.from_pretrained(_hf_model(arch), str(tmp_path / "adapter")).eval()
    for theirs in (_torch_outputs(arch, peft_model, tokens), _torch_outputs(arch, loaded, tokens)):
        for k in theirs:
            assert np.max(np.abs(ours[k] - theirs[k])) <= ATOL, k
    assert np.max(np.abs(ours["hidden"] - _ref(arch)["base_hidden"])) > 0.1


def _torch_outputs(arch, peft_model, tokens):
    import torch

    ids = torch.tensor(tokens)
    with torch.no_grad():
        if arch == "bert":
            out = peft_model(input_ids=ids, token_type_ids=torch.zeros_like(ids), attention_mask=torch.ones_like(ids))
            return {"hidden": out.last_hidden_state.numpy(), "pooled": out.pooler_output.numpy()}
        return {"hidden": peft_model.get_base_model().model(input_ids=ids).last_hidden_state.numpy()}


@pytest.mark.parametrize("arch,saved", [("llama", "token_embedding"), ("qwen2", "token_embedding"),
                                        ("bert", "pooled_dense")], ids=["untied_head", "tied_head", "bert_pooler"])
def test_peft_loads_tf_lora_modules_to_save(arch, saved, tmp_path):
    """modules_to_save out of tf_lora: the token embedding (untied Llama, tied Qwen2) as PEFT's
    embed_tokens + lm_head, BERT's pooled_dense as pooler.dense; PEFT computes what Keras does."""
    torch = pytest.importorskip("torch", reason="the live PEFT tests need torch")
    peft = pytest.importorskip("peft", reason="the live PEFT tests need peft")

    base = _backbone(arch) if arch == "bert" else CAUSAL_LM[arch](_backbone(arch), preprocessor=None)
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, target_modules=("query", "value"), modules_to_save=(saved,)))
    rng = np.random.default_rng(1)
    for v in model.lora_variables:
        v.assign(v.numpy() + rng.normal(0, 0.2 if "lora" in v.path else 0.05, v.shape).astype("float32"))
    tf_lora.save_adapter(model, str(tmp_path / "adapter"), format="peft")
    expected = {"token_embedding": ["embed_tokens", "lm_head"], "pooled_dense": ["pooler.dense"]}[saved]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == expected and config["ensure_weight_tying"] == (arch == "qwen2")

    loaded = peft.PeftModel.from_pretrained(_hf_model(arch), str(tmp_path / "adapter")).eval()
    tokens = _ref(arch)["tokens"]
    ours = _outputs(arch, model, tokens)
    if arch == "bert":
        theirs = _torch_outputs(arch, loaded, tokens)
    else:
        with torch.no_grad():
            theirs = {"logits": loaded(input_ids=torch.tensor(tokens)).logits.numpy()}
    for k in theirs:
        assert np.max(np.abs(ours[k] - theirs[k])) <= ATOL, k
    # modules_to_save matter: without them the outputs are far off.
    plain = _outputs(arch, base, tokens)
    assert max(float(np.max(np.abs(plain[k] - theirs[k]))) for k in theirs) > 0.05
    # And back: what PEFT itself saves from it (a tied head: `ensure_weight_tying`, modules_to_save
    # rewritten to ["embed_tokens", "model.embed_tokens"], both tensors written) reads to the same model.
    loaded.save_pretrained(str(tmp_path / "peft_saved"))
    again = tf_lora.from_peft(_backbone(arch) if arch == "bert" else CAUSAL_LM[arch](_backbone(arch), preprocessor=None),
                              str(tmp_path / "peft_saved"))
    for k, v in _outputs(arch, again, tokens).items():
        np.testing.assert_array_equal(v, ours[k])


@pytest.mark.parametrize("saved", ["pooler", "pooler.dense"])
def test_from_peft_reads_a_peft_made_bert_pooler_in_modules_to_save(saved, tmp_path):
    """PEFT's "all-linear" + modules_to_save=["pooler"] puts no LoRA on pooler.dense and saves it
    whole (``pooler.dense.weight`` / ``.bias``): KerasHub's pooled_dense, kernel transposed."""
    torch = pytest.importorskip("torch", reason="the live PEFT tests need torch")
    peft = pytest.importorskip("peft", reason="the live PEFT tests need peft")

    torch.manual_seed(3)
    peft_model = peft.get_peft_model(_hf_model("bert"), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules="all-linear", modules_to_save=[saved], init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.eval().save_pretrained(str(tmp_path / "adapter"))
    model = tf_lora.from_peft(_backbone("bert"), str(tmp_path / "adapter"))
    assert "pooled_dense" not in _adapter_paths(model)
    assert [l.name for l in model.modules_to_save_layers()] == ["pooled_dense"]
    tokens = _ref("bert")["tokens"]
    ours, theirs = _outputs("bert", model, tokens), _torch_outputs("bert", peft_model, tokens)
    for k in theirs:
        assert np.max(np.abs(ours[k] - theirs[k])) <= ATOL, k
    assert np.max(np.abs(ours["pooled"] - _ref("bert")["base_pooled"])) > 0.05


# -- Embedding targets (embed_tokens) ------------------------------------------------------------------------
_EMBED_KEYS = ("base_model.model.model.embed_tokens.lora_embedding_A", "base_model.model.model.embed_tokens.lora_embedding_B")


def _embed_ref():
    return np.load(_dir("llama", "ref_embed.npz"))


@pytest.mark.parametrize("task", [False, True], ids=["backbone", "causal_lm"])
def test_embed_tokens_target_equals_peft(task):
    """PEFT's Embedding LoRA (``lora_embedding_A`` (r, vocab), ``lora_embedding_B`` (dim, r), rsLoRA) on the
    untied llama base + q_proj: the token embedding becomes a LoRAReversibleEmbedding and the
    outputs are PEFT's (the untied LM head is not adapted, as in PEFT)."""
    ref = _embed_ref()
    model = _backbone("llama")
    model = CAUSAL_LM["llama"](model, preprocessor=None) if task else model
    assert not (model.backbone if task else model).token_embedding.tie_weights
    adapted = tf_lora.from_peft(model, _dir("llama", "adapter_embed"))
    embedding = (adapted.backbone if task else adapted).get_layer("token_embedding")
    assert isinstance(embedding, LoRAReversibleEmbedding)
    a, b = embedding.adapter_variables("default")
    original = load_file(_dir("llama", "adapter_embed", "adapter_model.safetensors"))
    np.testing.assert_array_equal(a.numpy(), original[_EMBED_KEYS[0]].T)
    np.testing.assert_array_equal(b.numpy(), original[_EMBED_KEYS[1]].T)
    assert embedding._spec("default")["use_rslora"] and embedding._spec("default")["rank"] == 4
    diffs = _max_diff("llama", adapted, ref, "peft")
    assert all(d <= ATOL for d in diffs.values()), diffs
    if not task:
        assert np.max(np.abs(_outputs("llama", adapted, ref["tokens"])["hidden"] - _ref("llama")["base_hidden"])) > 0.1


def test_embed_tokens_export_round_trip_is_bit_exact(tmp_path):
    model = tf_lora.from_peft(_backbone("llama"), _dir("llama", "adapter_embed"))
    tf_lora.save_adapter(model, str(tmp_path / "out"), format="peft")
    original = load_file(_dir("llama", "adapter_embed", "adapter_model.safetensors"))
    written = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    # PEFT also saves the (unchanged) base table with an Embedding target; tf_lora leaves it out.
    assert set(written) == {k for k in original if not k.endswith(".base_layer.weight")}
    for key, value in written.items():
        np.testing.assert_array_equal(value, original[key], err_msg=key)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["embed_tokens", "q_proj"]
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 6, True)
    again = tf_lora.from_peft(_backbone("llama"), str(tmp_path / "out"))
    ref = _embed_ref()
    np.testing.assert_array_equal(_outputs("llama", again, ref["tokens"])["hidden"],
                                  _outputs("llama", model, ref["tokens"])["hidden"])


def test_peft_loads_a_tf_lora_embed_tokens_adapter(tmp_path):
    torch = pytest.importorskip("torch", reason="the live PEFT tests need torch")
    peft = pytest.importorskip("peft", reason="the live PEFT tests need peft")
    config = tf_lora.LoRAConfig(rank=3, alpha=5, target_modules=["token_embedding", "query", "value"])
    model = tf_lora.adapt(CAUSAL_LM["llama"](_backbone("llama"), preprocessor=None), config)
    rng = np.random.default_rng(0)
    for v in model.trainable_variables:
        v.assign(rng.normal(0, 0.2, v.shape).astype("float32"))
    tf_lora.save_adapter(model, str(tmp_path / "adapter"), format="peft")
    assert set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))) >= set(_EMBED_KEYS)

    peft_model = peft.get_peft_model(_hf_model("llama"), peft.LoraConfig.from_pretrained(str(tmp_path / "adapter")))
    result = peft.set_peft_model_state_dict(peft_model, peft.utils.load_peft_weights(str(tmp_path / "adapter")))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    loaded = peft.PeftModel.from_pretrained(_hf_model("llama"), str(tmp_path / "adapter")).eval()
    assert type(loaded.get_base_model().model.embed_tokens).__name__ == "Embedding"  # peft.tuners.lora.Embedding
    tokens = _embed_ref()["tokens"]
    ours = np.asarray(model(_inputs("llama", tokens), training=False))
    for theirs in (peft_model.eval(), loaded):
        with torch.no_grad():
            logits = theirs(input_ids=torch.tensor(tokens)).logits.numpy()
        assert np.max(np.abs(ours - logits)) <= ATOL
    assert np.max(np.abs(ours - _ref("llama")["base_logits"])) > 0.1


def test_embed_tokens_on_a_tied_embedding_is_not_implemented(tmp_path):
    """Qwen2's fixture ties the LM head to the table: tf_lora's adapted table would change the
    logits, PEFT's Embedding LoRA does not. Both directions refuse, before anything changes."""
    backbone = _backbone("qwen2")
    assert backbone.token_embedding.tie_weights
    before = _snapshot(backbone)
    with pytest.raises(NotImplementedError, match="target_modules.*embed_tokens.*tied"):
        tf_lora.from_peft(backbone, _dir("llama", "adapter_embed"), inplace=True)  # same shapes as qwen2's
    assert not _adapter_paths(backbone)
    for w, v in zip(before, backbone.weights):
        np.testing.assert_array_equal(w, v.numpy())
    model = tf_lora.adapt(backbone, tf_lora.LoRAConfig(rank=2, target_modules=["token_embedding", "query"]))
    with pytest.raises(NotImplementedError, match="target_modules.*embed_tokens.*tied"):
        tf_lora.save_adapter(model, str(tmp_path / "out"), format="peft")
    assert not (tmp_path / "out").exists()
