"""`load_gguf`: a GGUF checkpoint (llama.cpp, Ollama) as a KerasHub CausalLM with its exact tokenizer.

Order of work, so that a bad file fails before anything large is allocated: read and check the
header (`GGUFFile`), pick the architecture (`gguf_archs.select`), check the hyper-parameters, the
vocabulary and every tensor's presence, type and shape; only then build the KerasHub backbone with
its variables left uninitialized (no random draws, no memory) and give each its value from the file,
one tensor at a time (dequantized by the `gguf` package, un-permuted, transposed), checking that
every backbone variable got one.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Dict, Optional, Union

import keras
import numpy as np

from tf_lora import _compat
from tf_lora.interop import gguf_archs
from tf_lora.interop.gguf_file import SUPPORTED_TYPES, GGUFFile
from tf_lora.interop.gguf_tokenizer import GGUFTokenizer


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's ``permute`` of q/k rows: per head, (2, d/2) interleaved back to (d/2, 2)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _to_keras(w: np.ndarray, layout: str, shape) -> np.ndarray:
    if layout == "T":
        return w.T.reshape(shape)
    if layout == "heads_first":  # (heads*head_dim, hidden) -> (heads, hidden, head_dim)
        return w.reshape(shape[0], shape[2], shape[1]).transpose(0, 2, 1)
    return w.reshape(shape)


def _check_tensors(file: GGUFFile, arch: gguf_archs.Arch, hp: Dict[str, Any]) -> Dict[str, tuple]:
    """Every tensor present, of a readable type and of the right shape; nothing unexpected."""
    expected = gguf_archs.expected_shapes(arch, hp)
    missing = [n for n in expected if n not in file.tensors and n not in arch.optional]
    if missing:
        raise ValueError(
            f"GGUF file '{file.path}' lacks {len(missing)} tensor(s) a {arch.name} model of "
            f"{hp['layers']} blocks needs, e.g. {', '.join(missing[:3])}."
        )
    extra = [n for n in file.tensors if n not in expected]
    if extra:
        raise NotImplementedError(
            f"GGUF file '{file.path}' holds tensors a KerasHub {arch.task} has no place for: "
            f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}."
        )
    for name, info in file.tensors.items():
        if info.shape != expected[name]:
            raise ValueError(
                f"GGUF file '{file.path}': tensor '{name}' has shape {info.shape}; the hyper-parameters "
                f"in the file give {expected[name]}."
            )
        if info.type_name not in SUPPORTED_TYPES:
            raise NotImplementedError(
                f"GGUF file '{file.path}': tensor '{name}' has type {info.type_name}, which tf_lora does "
                f"not read. Supported: {', '.join(SUPPORTED_TYPES)}."
            )
    return expected


def _targets(arch: gguf_archs.Arch, hp: Dict[str, Any], names) -> Dict[str, tuple]:
    """GGUF tensor name -> (KerasHub variable path, layout, stem)."""
    out = {}
    for name in names:
        if name.startswith("blk."):
            _, i, stem = name.split(".", 2)
            path, layout = arch.blocks[stem]
            out[name] = (arch.block.format(i=i) + "/" + path, layout, stem)
        else:
            path, layout = arch.top[name]
            out[name] = (path, layout, name)
    return out


class _Reader:
    """Reads a GGUF tensor as the value of its KerasHub variable; keeps the last one (a deferred kernel is
    read twice in a row when it is quantized)."""

    def __init__(self, file: GGUFFile, arch: gguf_archs.Arch, hp: Dict[str, Any]):
        self.file, self.arch, self.hp, self.last = file, arch, hp, (None, None)

    def __call__(self, name: str, layout: str, stem: str, variable) -> Any:
        if self.last[0] == (name, variable.path):
            return self.last[1]
        arch, hp = self.arch, self.hp
        w = self.file.read(name.split("#")[0])
        if arch.permute_qk and stem == "attn_q.weight":
            w = _unpermute(w, hp["heads"])
        elif arch.permute_qk and stem == "attn_k.weight":
            w = _unpermute(w, hp["kv_heads"])
        if stem.endswith("norm.weight"):
            w = w + np.float32(arch.norm_offset)
        value = keras.ops.cast(_to_keras(w, layout, tuple(variable.shape)), variable.dtype)
        self.last = ((name, variable.path), value)
        return value


def _fill(backbone, file: GGUFFile, arch: gguf_archs.Arch, hp: Dict[str, Any], defer: bool = False):
    """Gives every backbone variable (created uninitialized) its value from the file, one tensor at a time.

    With `defer`, the projection kernels stay uninitialized and read their value from the file when
    read (`_compat.defer_value`), so QLoRA can quantize them one at a time without a float copy of the
    model; returns ``[(variable, value function)]`` of those, for the ones adapt does not replace.
    """
    variables = {v.path: v for v in backbone.weights}
    targets = _targets(arch, hp, file.tensors)
    if "token_embedding/reverse_embeddings" in variables and "output.weight" not in file.tensors:
        targets["token_embd.weight#head"] = ("token_embedding/reverse_embeddings", "T", "output.weight")
    reader, deferred, written = _Reader(file, arch, hp), [], set()
    for name, (path, layout, stem) in targets.items():
        if path not in variables:
            raise RuntimeError(f"{type(backbone).__name__} has no variable '{path}' for GGUF tensor '{name}'.")
        variable = variables[path]
        value = functools.partial(reader, name, layout, stem, variable)
        if defer and layout == "T" and stem.startswith(("attn_", "ffn_")):
            _compat.defer_value(variable, value)
            deferred.append((variable, value))
        else:
            _compat.initialize_variable(variable, value())
        written.add(path)
    unwritten = sorted(set(variables) - written)
    if unwritten:  # never hand back a model with uninitialized or random weights
        raise RuntimeError(f"GGUF file '{file.path}' left {type(backbone).__name__} variables unset: {unwritten[:5]}.")
    return deferred


def _check_options(path, dtype, quantization, lora, sequence_length):
    import keras

    from tf_lora.config import LoRAConfig, QLoRAConfig

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"Received an invalid value for `path`, expected a str or os.PathLike. Received: path={path!r}")
    if dtype is not None:
        keras.dtype_policies.get(dtype)  # raises ValueError for an unknown dtype, before anything is built
    if quantization is not None and not isinstance(quantization, QLoRAConfig):
        raise TypeError(f"Received an invalid value for `quantization`, expected None or a tf_lora.QLoRAConfig. "
                        f"Received: quantization={quantization!r}")
    if lora is not None and not isinstance(lora, LoRAConfig):
        raise TypeError(f"Received an invalid value for `lora`, expected None or a tf_lora.LoRAConfig. "
                        f"Received: lora={lora!r}")
    if lora is not None and quantization is not None and lora.quantization not in (None, quantization):
        raise ValueError("`quantization` and `lora.quantization` disagree; give one of them. Received: "
                         f"quantization={quantization!r}, lora.quantization={lora.quantization!r}")
    if not isinstance(sequence_length, int) or isinstance(sequence_length, bool) or sequence_length <= 0:
        raise ValueError(f"Received an invalid value for `sequence_length`, expected a positive integer. "
                         f"Received: sequence_length={sequence_length!r}")


def load_gguf(path: Union[str, os.PathLike], *, dtype: Optional[Any] = None, quantization=None, lora=None,
              sequence_length: int = 1024):
    """Loads a GGUF checkpoint as a KerasHub CausalLM with a tokenizer that tokenizes like the original.

    Supported architectures: ``llama`` (Llama 2/3, SmolLM, TinyLlama: `Llama3CausalLM` for a
    byte-level BPE vocabulary, `LlamaCausalLM` for a SentencePiece one; a ``llama`` file named
    Mistral gives `MistralCausalLM`), ``mistral`` (`MistralCausalLM`), ``qwen2`` (`QwenCausalLM`) and
    ``gemma`` (`GemmaCausalLM`). Tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the
    K-quants Q2_K ... Q6_K, dequantized by the ``gguf`` package (``pip install 'tf_lora[gguf]'``).

    The model takes every hyper-parameter from the file (RMSNorm epsilon, rope base, tied
    embeddings, heads and key/value heads). Its preprocessor's tokenizer is a `GGUFTokenizer`: the
    same ids as transformers' tokenizer loaded from the same file; a start token is prepended only
    where the file says so (not for ChatML models such as SmolLM2). The chat template is
    ``lm.preprocessor.tokenizer.chat_template`` (also ``lm.preprocessor.chat_template``).

    Args:
        path: The ``.gguf`` file.
        dtype: The backbone's dtype or dtype policy (``"bfloat16"``, ``"mixed_bfloat16"``); `None`
            uses Keras' default (float32).
        quantization: A `tf_lora.QLoRAConfig`: put QLoRA adapters with NF4 base weights on the
            layers `lora` targets (every linear layer by default), in place. The float model is
            never held: each projection kernel is read from the file while it is quantized.
        lora: A `tf_lora.LoRAConfig` to adapt the loaded model with, in place (its
            `quantization`, or `quantization` above, makes it QLoRA).
        sequence_length: The preprocessor's sequence length for `fit` / `generate`.

    Returns:
        A KerasHub CausalLM (`Llama3CausalLM`, `LlamaCausalLM`, `MistralCausalLM`, `QwenCausalLM`
        or `GemmaCausalLM`) with its preprocessor.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not a GGUF file, a truncated or corrupt one, a missing tensor, a tensor of the
            wrong shape, invalid hyper-parameters (each message names the file); bad arguments.
        NotImplementedError: An architecture, tensor type or model variant tf_lora does not load.
        TypeError: Arguments of the wrong type.

    Example:
        >>> lm = tf_lora.load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
        >>> lm.generate("<|im_start|>user\\nHi!<|im_end|>\\n<|im_start|>assistant\\n", max_length=32)  # doctest: +SKIP
    """
    _check_options(path, dtype, quantization, lora, sequence_length)
    file = GGUFFile(path)
    metadata = file.metadata
    arch = gguf_archs.select(metadata, file.path)
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ValueError(f"GGUF file '{file.path}' has no vocabulary (tokenizer.ggml.tokens).")
    arch_key = metadata["general.architecture"]
    hp = gguf_archs.hyper_parameters(metadata, arch_key, len(tokens), "output.weight" not in file.tensors, file.path)
    stated = metadata.get(f"{arch_key}.vocab_size", len(tokens))
    if stated != len(tokens):
        raise ValueError(f"GGUF file '{file.path}': {arch_key}.vocab_size is {stated} but the vocabulary has "
                         f"{len(tokens)} tokens.")
    _check_tensors(file, arch, hp)
    try:
        tokenizer = GGUFTokenizer.from_metadata(metadata)
    except (ValueError, NotImplementedError) as err:
        raise type(err)(f"GGUF file '{file.path}': {err}") from err

    import keras_hub

    with _compat.deferred_variables():  # no random initialization: each variable gets the file's value
        backbone = getattr(keras_hub.models, arch.backbone)(**arch.config(hp), dtype=dtype)
    created = list(backbone.weights)
    try:
        deferred = _fill(backbone, file, arch, hp, defer=quantization is not None
                         or (lora is not None and lora.quantization is not None))
        lm = _task(keras_hub, arch, backbone, tokenizer, sequence_length)
        if quantization is not None or lora is not None:
            from tf_lora.adapt import adapt
            from tf_lora.config import LoRAConfig

            config = lora if lora is not None else LoRAConfig(target_modules="all-linear")
            if quantization is not None:
                config = dataclasses.replace(config, quantization=quantization)
            lm = adapt(lm, config, inplace=True)  # reads each deferred kernel as it quantizes it
        kept = {id(v) for v in lm.weights}
        for variable, value in deferred:  # kernels adapt left in place get their value now
            if id(variable) in kept and not _compat.is_initialized(variable):
                _compat.initialize_variable(variable, value())
    finally:
        _compat.forget_deferred(created)
    return lm


def _task(keras_hub, arch, backbone, tokenizer, sequence_length):
    preprocessor = getattr(keras_hub.models, arch.preprocessor)(
        tokenizer=tokenizer, sequence_length=sequence_length, add_start_token=tokenizer.add_bos,
        add_end_token=tokenizer.eos_token is not None)
    preprocessor.chat_template = tokenizer.chat_template
    return getattr(keras_hub.models, arch.task)(backbone=backbone, preprocessor=preprocessor)
