"""GGUF architectures -> KerasHub classes, hyper-parameters and weights, one table row per architecture (data).

Tensor names are llama.cpp's (``blk.{i}.attn_q.weight``; `gguf.TENSOR_NAMES`), weights in torch
layout ``(out, in)``; KerasHub paths are the backbone's variable paths, read off KerasHub 0.32's
own converters (``keras_hub/src/utils/transformers/convert_llama3.py``, ``convert_qwen.py``,
``convert_mistral.py``, ``convert_gemma.py``). Layouts:

- ``"T"``: a projection: ``W.T`` reshaped to the kernel (``(hidden, heads, head_dim)`` for an
  attention input, ``(heads, head_dim, hidden)`` for its output, ``(in, out)`` for a Dense).
- ``"heads_first"``: Gemma's attention input kernels ``(heads, hidden, head_dim)``.
- ``"copy"``: a vector (norm scale, bias) or the ``(vocab, hidden)`` embedding, reshaped.

llama.cpp's converter permutes the rows of Llama/Mistral q and k projections for its rope layout
(``convert_hf_to_gguf.py``, ``LlamaModel.permute``); `Arch.permute_qk` says to undo it. It stores
Gemma's RMSNorm scales as ``1 + w``; `Arch.norm_offset` undoes that (KerasHub adds the 1 itself).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Tuple

# Inside block i: GGUF stem -> (KerasHub path inside the block, layout).
_LLAMA_BLOCK = {
    "attn_norm.weight": ("self_attention_layernorm/scale", "copy"),
    "attn_q.weight": ("self_attention/query/kernel", "T"),
    "attn_k.weight": ("self_attention/key/kernel", "T"),
    "attn_v.weight": ("self_attention/value/kernel", "T"),
    "attn_output.weight": ("self_attention/attention_output/kernel", "T"),
    "ffn_norm.weight": ("feedforward_layernorm/scale", "copy"),
    "ffn_gate.weight": ("feedforward_gate_dense/kernel", "T"),
    "ffn_up.weight": ("feedforward_intermediate_dense/kernel", "T"),
    "ffn_down.weight": ("feedforward_output_dense/kernel", "T"),
}
_QWEN_BLOCK = {
    **_LLAMA_BLOCK,
    "attn_q.bias": ("self_attention/query/bias", "copy"),
    "attn_k.bias": ("self_attention/key/bias", "copy"),
    "attn_v.bias": ("self_attention/value/bias", "copy"),
}
_GEMMA_BLOCK = {
    "attn_norm.weight": ("pre_attention_norm/scale", "copy"),
    "attn_q.weight": ("attention/query/kernel", "heads_first"),
    "attn_k.weight": ("attention/key/kernel", "heads_first"),
    "attn_v.weight": ("attention/value/kernel", "heads_first"),
    "attn_output.weight": ("attention/attention_output/kernel", "T"),
    "ffn_norm.weight": ("pre_ffw_norm/scale", "copy"),
    "ffn_gate.weight": ("ffw_gating/kernel", "T"),
    "ffn_up.weight": ("ffw_gating_2/kernel", "T"),
    "ffn_down.weight": ("ffw_linear/kernel", "T"),
}
_LLAMA_TOP = {
    "token_embd.weight": ("token_embedding/embeddings", "copy"),
    "output.weight": ("token_embedding/reverse_embeddings", "T"),
    "output_norm.weight": ("sequence_output_layernorm/scale", "copy"),
}
_GEMMA_TOP = {
    "token_embd.weight": ("token_embedding/embeddings", "copy"),
    "output_norm.weight": ("final_normalization/scale", "copy"),
}


@dataclasses.dataclass(frozen=True)
class Arch:
    """How one GGUF architecture becomes a KerasHub CausalLM.

    Attributes:
        name: Name for messages.
        task, preprocessor, backbone: KerasHub class names (``keras_hub.models.<name>``).
        block: KerasHub name of transformer block i (``{i}``).
        blocks: GGUF stem inside a block -> (KerasHub path inside the block, layout).
        top: GGUF tensor outside the blocks -> (KerasHub path, layout).
        optional: GGUF tensors that may be absent (an untied LM head).
        permute_qk: Undo llama.cpp's rope permutation of q/k rows.
        norm_offset: Added to every RMSNorm scale read.
        config: Backbone keyword arguments from the hyper-parameters (see `hyper_parameters`).
    """

    name: str
    task: str
    preprocessor: str
    backbone: str
    block: str
    blocks: Mapping[str, Tuple[str, str]]
    top: Mapping[str, Tuple[str, str]]
    config: Callable[[Dict[str, Any]], Dict[str, Any]]
    optional: Tuple[str, ...] = ("output.weight",)
    permute_qk: bool = False
    norm_offset: float = 0.0


def _common(hp: Dict[str, Any]) -> Dict[str, Any]:
    return dict(vocabulary_size=hp["vocab"], num_layers=hp["layers"], num_query_heads=hp["heads"],
                num_key_value_heads=hp["kv_heads"], hidden_dim=hp["hidden"], intermediate_dim=hp["ffn"],
                layer_norm_epsilon=hp["eps"])


def _llama_config(hp):  # LlamaBackbone, Llama3Backbone and QwenBackbone
    return dict(_common(hp), rope_max_wavelength=hp["theta"], tie_word_embeddings=hp["tied"])


def _mistral_config(hp):
    return dict(_common(hp), rope_max_wavelength=hp["theta"], head_dim=hp["head_dim"],
                sliding_window=hp["sliding_window"])


def _gemma_config(hp):
    # KerasHub's Gemma MLP width is twice Hugging Face's intermediate_size (convert_gemma.py).
    return dict(_common(hp), intermediate_dim=2 * hp["ffn"], head_dim=hp["head_dim"])


_LLAMA_ROWS = dict(block="transformer_layer_{i}", blocks=_LLAMA_BLOCK, top=_LLAMA_TOP, permute_qk=True)
LLAMA3 = Arch("llama (byte-level BPE vocabulary)", "Llama3CausalLM", "Llama3CausalLMPreprocessor",
              "Llama3Backbone", config=_llama_config, **_LLAMA_ROWS)
LLAMA = Arch("llama (SentencePiece vocabulary)", "LlamaCausalLM", "LlamaCausalLMPreprocessor",
             "LlamaBackbone", config=_llama_config, **_LLAMA_ROWS)
MISTRAL = Arch("mistral", "MistralCausalLM", "MistralCausalLMPreprocessor", "MistralBackbone",
               config=_mistral_config, **_LLAMA_ROWS)
QWEN2 = Arch("qwen2", "QwenCausalLM", "QwenCausalLMPreprocessor", "QwenBackbone", block="transformer_layer_{i}",
             blocks=_QWEN_BLOCK, top=_LLAMA_TOP, config=_llama_config)
GEMMA = Arch("gemma", "GemmaCausalLM", "GemmaCausalLMPreprocessor", "GemmaBackbone", block="decoder_block_{i}",
             blocks=_GEMMA_BLOCK, top=_GEMMA_TOP, config=_gemma_config, optional=(), norm_offset=-1.0)

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma")


def select(metadata: Mapping[str, Any], path: str) -> Arch:
    """The table row for a file: by ``general.architecture``, and for ``llama`` by its vocabulary.

    llama.cpp writes Mistral models as ``llama``; a ``llama`` file whose ``general.name`` or
    ``general.basename`` says Mistral (and whose vocabulary is SentencePiece) becomes a
    `MistralCausalLM`, which computes the same thing. A byte-level BPE vocabulary (Llama 3,
    SmolLM) gives the Llama 3 classes, a SentencePiece one (Llama 2, TinyLlama) the Llama classes.
    """
    arch = metadata.get("general.architecture")
    spm = metadata.get("tokenizer.ggml.model") == "llama"
    if arch == "llama":
        named = f"{metadata.get('general.name', '')} {metadata.get('general.basename', '')}".lower()
        return MISTRAL if spm and "mistral" in named else (LLAMA if spm else LLAMA3)
    rows = {"mistral": MISTRAL, "qwen2": QWEN2, "gemma": GEMMA}
    if arch not in rows:
        raise NotImplementedError(
            f"GGUF file '{path}' has architecture {arch!r}, which tf_lora does not load. Supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    return rows[arch]


def hyper_parameters(metadata: Mapping[str, Any], arch_key: str, vocab: int, tied: bool, path: str) -> Dict[str, Any]:
    """The hyper-parameters a file states, checked (``<arch>.block_count`` etc.).

    Raises:
        ValueError: A missing or invalid value (the message names the key and the file).
        NotImplementedError: A variant KerasHub's class does not compute (rope scaling, a partial
            rotary dimension, a head size the class cannot take).
    """

    def get(key, default=None, kind=int):
        value = metadata.get(f"{arch_key}.{key}", default)
        types = (int,) if kind is int else (int, float)
        if not (isinstance(value, types) and not isinstance(value, bool) and value > 0):
            what = "missing" if value is None else f"{value!r}"
            raise ValueError(f"GGUF file '{path}': {arch_key}.{key} is {what}; expected a positive number.")
        return value

    hp = dict(layers=get("block_count"), hidden=get("embedding_length"), ffn=get("feed_forward_length"),
              heads=get("attention.head_count"), vocab=vocab, tied=tied,
              eps=float(get("attention.layer_norm_rms_epsilon", kind=float)),
              theta=float(get("rope.freq_base", 10000.0, kind=float)))
    hp["kv_heads"] = get("attention.head_count_kv", hp["heads"])
    hp["head_dim"] = get("attention.key_length", hp["hidden"] // hp["heads"])
    if hp["heads"] % hp["kv_heads"]:
        raise ValueError(f"GGUF file '{path}': {hp['heads']} attention heads is not a multiple of "
                         f"{hp['kv_heads']} key/value heads.")
    unsupported = []
    if get("attention.value_length", hp["head_dim"]) != hp["head_dim"]:
        unsupported.append("a value head size different from the key head size")
    if arch_key != "gemma" and get("rope.dimension_count", hp["head_dim"]) != hp["head_dim"]:
        unsupported.append("rope on part of each head (rope.dimension_count < head size)")
    scaling = metadata.get(f"{arch_key}.rope.scaling.type")
    if scaling not in (None, "none") or metadata.get(f"{arch_key}.rope.scaling.factor", 1.0) not in (0, 1, 0.0, 1.0):
        unsupported.append(f"rope scaling {scaling!r}")
    if arch_key in ("llama", "qwen2") and hp["head_dim"] * hp["heads"] != hp["hidden"]:
        unsupported.append(f"a head size of {hp['head_dim']} with {hp['heads']} heads and width {hp['hidden']}")
    if arch_key == "gemma" and hp["theta"] != 10000.0:
        unsupported.append(f"rope base {hp['theta']} (KerasHub's Gemma uses 10000)")
    if unsupported:
        raise NotImplementedError(f"GGUF file '{path}' uses {'; '.join(unsupported)}, which tf_lora does not load.")
    hp["sliding_window"] = metadata.get(f"{arch_key}.attention.sliding_window")
    return hp


def expected_shapes(arch: Arch, hp: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """NumPy shape of every tensor the file must (or, for `Arch.optional`, may) hold."""
    h, q, kv = hp["hidden"], hp["heads"] * hp["head_dim"], hp["kv_heads"] * hp["head_dim"]
    block = {"attn_norm.weight": (h,), "attn_q.weight": (q, h), "attn_k.weight": (kv, h), "attn_v.weight": (kv, h),
             "attn_output.weight": (h, q), "ffn_norm.weight": (h,), "ffn_gate.weight": (hp["ffn"], h),
             "ffn_up.weight": (hp["ffn"], h), "ffn_down.weight": (h, hp["ffn"]),
             "attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,)}
    top = {"token_embd.weight": (hp["vocab"], h), "output.weight": (hp["vocab"], h), "output_norm.weight": (h,)}
    shapes = {name: top[name] for name in arch.top}
    for i in range(hp["layers"]):
        shapes.update({f"blk.{i}.{stem}": block[stem] for stem in arch.blocks})
    return shapes
