"""Small KerasHub models built from config (random weights, no download) for the tests:
one per architecture tf_lora supports end to end."""

import keras
import keras_hub
import numpy as np

M = keras_hub.models
VOCAB, SEQ = 64, 8

_DECODER = dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=2, num_key_value_heads=1,
                hidden_dim=16, intermediate_dim=32)


def gpt2():
    backbone = M.GPT2Backbone(vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=16,
                              intermediate_dim=32, max_sequence_length=32)
    return M.GPT2CausalLM(backbone, preprocessor=None)


def gemma():
    backbone = M.GemmaBackbone(vocabulary_size=VOCAB, num_layers=2, num_query_heads=2, num_key_value_heads=1,
                               hidden_dim=16, intermediate_dim=32, head_dim=8)
    return M.GemmaCausalLM(backbone, preprocessor=None)


def llama3():
    # Rope scaling is what keras-hub 0.32's LlamaTransformerDecoder.get_config drops.
    return M.Llama3CausalLM(M.Llama3Backbone(**_DECODER, rope_position_scaling_factor=2.0), preprocessor=None)


def qwen():
    return M.QwenCausalLM(M.QwenBackbone(**_DECODER), preprocessor=None)


def mistral():
    return M.MistralCausalLM(M.MistralBackbone(**_DECODER), preprocessor=None)


def bert():
    backbone = M.BertBackbone(vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=16,
                              intermediate_dim=32, max_sequence_length=32)
    return M.BertTextClassifier(backbone, num_classes=3, preprocessor=None)


FACTORIES = {"bert": bert, "gpt2": gpt2, "gemma": gemma, "llama3": llama3, "qwen": qwen, "mistral": mistral}


def inputs(model, batch=4, seed=0):
    rng = np.random.default_rng(seed)
    x = {"token_ids": rng.integers(1, VOCAB, (batch, SEQ)), "padding_mask": np.ones((batch, SEQ), "int32")}
    if "segment_ids" in model.backbone.input:
        x["segment_ids"] = np.zeros((batch, SEQ), "int32")
    return x


def labels(model, x, seed=1):
    rng = np.random.default_rng(seed)
    if isinstance(model, M.CausalLM):
        return rng.integers(0, VOCAB, x["token_ids"].shape)
    return rng.integers(0, 3, len(x["token_ids"]))


def prompt():
    return {"token_ids": np.array([[5, 6, 7, 0, 0, 0, 0, 0]]), "padding_mask": np.array([[1, 1, 1, 0, 0, 0, 0, 0]])}


def compile_greedy(model):
    kwargs = dict(sampler="greedy") if isinstance(model, M.CausalLM) else {}
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False, **kwargs)
