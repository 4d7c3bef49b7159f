"""Hugging Face module names <-> KerasHub layer paths, one table per architecture (data only).

Each table was read off KerasHub 0.32's own converter,
``keras_hub/src/utils/transformers/convert_<arch>.py``: every ``port_weight(keras kernel,
"<hf module>.weight", hook_fn)`` of an attention or MLP projection is one row here. Every
converter hook is ``W.T`` reshaped to the kernel's input-side axes then its output-side
axes (Gemma's reshape + transpose is the same thing written for its (heads, hidden,
head_dim) kernel), which is the layout `tf_lora.peft` assumes; tests/test_peft.py checks
it on every row against the real checkpoint.

Names are relative to the Hugging Face base model (``LlamaModel``, ``BertModel``) and to
the KerasHub Backbone. ``prefixes`` are where that base model sits inside the models
PEFT wraps (``LlamaForCausalLM.model``, ``BertForSequenceClassification.bert``); the
first one is written on export.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Tuple


@dataclasses.dataclass(frozen=True)
class NameMap:
    """How one architecture's Hugging Face module names map onto KerasHub layer paths.

    Attributes:
        name: A short architecture name (for messages).
        model_types: ``config.json`` ``model_type`` values of this architecture.
        backbones: KerasHub Backbone class names (matched along the class's MRO).
        prefixes: Module-name prefixes of the base model inside the task models PEFT
            wraps; the first is the one `save_adapter(format="peft")` writes.
        block: ``(hf, keras)`` prefix of one transformer block, with ``{i}`` its index.
        blocks: Hugging Face name inside a block -> KerasHub path inside the block.
        top: Hugging Face name outside the blocks -> KerasHub path in the backbone.
        embeddings: Embedding modules PEFT can put a LoRA on (``lora_embedding_A`` (r, vocab),
            ``lora_embedding_B`` (dim, r); never under "all-linear") -> KerasHub path in the
            backbone (a tf_lora `LoRAEmbedding` / `LoRAReversibleEmbedding` there).
        unsupported: Modules PEFT can target that tf_lora cannot adapt: name relative to
            the base model (embeddings) -> what it is.
        outer: The same for modules of the task model outside the base model (LM head,
            classifier), named relative to the task model.
        saved: `modules_to_save` modules PEFT saves whole: Hugging Face module name
            (relative to the base model) -> ``(KerasHub path in the backbone, {Hugging Face
            parameter: KerasHub variable})``; a variable ending in ``.T`` holds the
            parameter transposed (torch Linear (out, in) vs Keras (in, out)).
        saved_outer: The same for modules of the task model outside the base model,
            named relative to the task model (the LM head).
        task_type: The PEFT ``task_type`` written on export.
        fused: Hugging Face modules that KerasHub splits into several layers: name inside a
            block -> the KerasHub paths inside the block its output rows go to, in order (GPT-2's
            ``attn.c_attn``: rows ``[:h]`` the query, ``[h:2h]`` the key, ``[2h:]`` the value).
            `tf_lora.peft_fused` says how a LoRA on one maps onto the parts.
        tied_readers: Task classes (names along the model's MRO) that read a tied token embedding
            in reverse as their LM head, so an Embedding LoRA on it would change their logits too
            (PEFT adapts the input lookup only): None for every model (the decoders' CausalLM);
            BERT's backbone and classifier never read it in reverse, its ``MaskedLM`` does.
        conv1d: The Hugging Face model stores its projections as ``Conv1D`` (weight (in, out),
            GPT-2): PEFT sets ``fan_in_fan_out`` for them, which changes only how it merges,
            not ``lora_A`` (r, in) / ``lora_B`` (out, r), so the adapter layout is the same.

    A KerasHub ``ReversibleEmbedding`` is both the input embedding and the LM head: untied,
    ``embeddings`` is ``embed_tokens.weight`` and ``reverse_embeddings`` is
    ``lm_head.weight.T``; tied (``tie_weights``, Gemma always), both Hugging Face tensors
    are its one ``embeddings`` table, so they must be equal (`tf_lora.peft` checks).
    """

    name: str
    model_types: Tuple[str, ...]
    backbones: Tuple[str, ...]
    prefixes: Tuple[str, ...]
    block: Tuple[str, str]
    blocks: Mapping[str, str]
    top: Mapping[str, str] = dataclasses.field(default_factory=dict)
    embeddings: Mapping[str, str] = dataclasses.field(default_factory=dict)
    unsupported: Mapping[str, str] = dataclasses.field(default_factory=dict)
    outer: Mapping[str, str] = dataclasses.field(default_factory=dict)
    saved: Mapping[str, Tuple[str, Mapping[str, str]]] = dataclasses.field(default_factory=dict)
    saved_outer: Mapping[str, Tuple[str, Mapping[str, str]]] = dataclasses.field(default_factory=dict)
    task_type: Optional[str] = None
    fused: Mapping[str, Tuple[str, ...]] = dataclasses.field(default_factory=dict)
    conv1d: bool = False
    tied_readers: Optional[Tuple[str, ...]] = None


# convert_*.py: embed_tokens.weight -> token_embedding.embeddings (a ReversibleEmbedding; tied or not).
_DECODER_EMBEDDINGS = {"embed_tokens": "token_embedding"}
_DECODER_OUTER = {"lm_head": "the LM head (a tied or reversible embedding in KerasHub)"}
# convert_llama3.py / convert_qwen.py / convert_mistral.py / convert_gemma.py: embed_tokens.weight ->
# token_embedding.embeddings; lm_head.weight -> token_embedding.reverse_embeddings (transposed) unless tied.
_DECODER_SAVED = {"embed_tokens": ("token_embedding", {"weight": "embeddings"})}
_DECODER_SAVED_OUTER = {"lm_head": ("token_embedding", {"weight": "reverse_embeddings.T"})}
_DECODER = dict(embeddings=_DECODER_EMBEDDINGS, outer=_DECODER_OUTER, saved=_DECODER_SAVED,
                saved_outer=_DECODER_SAVED_OUTER, task_type="CAUSAL_LM")

# convert_llama3.py (Llama3Backbone), convert_qwen.py (QwenBackbone) and
# convert_mistral.py (MistralBackbone) port the same seven projections to the same paths.
_LLAMA_BLOCK = {
    "self_attn.q_proj": "self_attention/query",
    "self_attn.k_proj": "self_attention/key",
    "self_attn.v_proj": "self_attention/value",
    "self_attn.o_proj": "self_attention/attention_output",
    "mlp.gate_proj": "feedforward_gate_dense",
    "mlp.up_proj": "feedforward_intermediate_dense",
    "mlp.down_proj": "feedforward_output_dense",
}

LLAMA = NameMap(
    name="llama", model_types=("llama",), backbones=("Llama3Backbone", "LlamaBackbone"),
    prefixes=("model.", ""), block=("layers.{i}.", "transformer_layer_{i}/"), blocks=_LLAMA_BLOCK,
    **_DECODER,
)

QWEN2 = NameMap(
    name="qwen2", model_types=("qwen2",), backbones=("QwenBackbone",),
    prefixes=("model.", ""), block=("layers.{i}.", "transformer_layer_{i}/"), blocks=_LLAMA_BLOCK,
    **_DECODER,
)

MISTRAL = NameMap(
    name="mistral", model_types=("mistral",), backbones=("MistralBackbone",),
    prefixes=("model.", ""), block=("layers.{i}.", "transformer_layer_{i}/"), blocks=_LLAMA_BLOCK,
    **_DECODER,
)

# convert_gemma.py (GemmaBackbone, model_type gemma and gemma2).
GEMMA = NameMap(
    name="gemma", model_types=("gemma", "gemma2"), backbones=("GemmaBackbone",),
    prefixes=("model.", ""), block=("layers.{i}.", "decoder_block_{i}/"),
    blocks={
        "self_attn.q_proj": "attention/query",
        "self_attn.k_proj": "attention/key",
        "self_attn.v_proj": "attention/value",
        "self_attn.o_proj": "attention/attention_output",
        "mlp.gate_proj": "ffw_gating",
        "mlp.up_proj": "ffw_gating_2",
        "mlp.down_proj": "ffw_linear",
    },
    **_DECODER,
)

# convert_bert.py (BertBackbone; the Hugging Face side is BertModel).
BERT = NameMap(
    name="bert", model_types=("bert",), backbones=("BertBackbone",),
    prefixes=("", "bert."), block=("encoder.layer.{i}.", "transformer_layer_{i}/"),
    blocks={
        "attention.self.query": "self_attention_layer/query",
        "attention.self.key": "self_attention_layer/key",
        "attention.self.value": "self_attention_layer/value",
        "attention.output.dense": "self_attention_layer/attention_output",
        "intermediate.dense": "feedforward_intermediate_dense",
        "output.dense": "feedforward_output_dense",
    },
    top={"pooler.dense": "pooled_dense"},
    # convert_bert.py: word_embeddings -> token_embedding (a ReversibleEmbedding that only BertMaskedLM's head
    # reads in reverse), token_type_embeddings -> segment_embedding (an Embedding).
    embeddings={"embeddings.word_embeddings": "token_embedding",
                "embeddings.token_type_embeddings": "segment_embedding"},
    tied_readers=("MaskedLM",),
    unsupported={"embeddings.position_embeddings": "a position embedding (KerasHub's PositionEmbedding)"},
    outer={"classifier": "a classification head outside the backbone"},
    saved={"pooler.dense": ("pooled_dense", {"weight": "kernel.T", "bias": "bias"}),
           "pooler": ("pooled_dense", {"dense.weight": "kernel.T", "dense.bias": "bias"})},
    task_type="FEATURE_EXTRACTION",
)

# convert_gpt2.py (GPT2Backbone): Conv1D weights (in, out) go to the kernels as they are (no
# transpose: still "W.T" of the torch-Linear (out, in) layout the adapter uses); c_attn's columns
# [:h], [h:2h], [2h:] to query, key, value. KerasHub ties the LM head to `wte` (tie_weights).
GPT2 = NameMap(
    name="gpt2", model_types=("gpt2",), backbones=("GPT2Backbone",),
    prefixes=("transformer.", ""), block=("h.{i}.", "transformer_layer_{i}/"),
    blocks={
        "attn.c_proj": "self_attention/attention_output",
        "mlp.c_fc": "feedforward_intermediate_dense",
        "mlp.c_proj": "feedforward_output_dense",
    },
    fused={"attn.c_attn": ("self_attention/query", "self_attention/key", "self_attention/value")},
    unsupported={"wte": "an Embedding tied to the LM head in KerasHub", "wpe": "a position Embedding target"},
    outer={"lm_head": "the LM head (tied to the token embedding in KerasHub)"},
    task_type="CAUSAL_LM", conv1d=True,
)

MAPS: Tuple[NameMap, ...] = (LLAMA, QWEN2, MISTRAL, GEMMA, BERT, GPT2)
