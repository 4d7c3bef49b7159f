"""The tokenizer a GGUF file describes, as a KerasHub tokenizer that tokenizes exactly like the reference.

A GGUF file stores its vocabulary, merges (or scores), token types, special token ids and chat
template as metadata. `build_tokenizer` (`gguf_vocab.py`) turns them into a `tokenizers.Tokenizer` (the Rust library
transformers' own tokenizers run on), piece by piece the way transformers builds its tokenizer from
the same file (`transformers.integrations.gguf.gguf_tokenizer_mapping`): byte-level BPE for
``tokenizer.ggml.model == "gpt2"`` (with the split regex of ``tokenizer.ggml.pre`` where
transformers knows one), SentencePiece-style BPE with byte fallback for ``"llama"``, Gemma's variant
for Gemma files. So ids equal transformers' `AutoTokenizer.from_pretrained(folder, gguf_file=...)`
ids (tests/test_gguf.py: thousands of standard-library lines, zero mismatches).

Why not KerasHub's `BytePairTokenizer`: inside `tf.data` it splits words with a regex that has no
look-ahead, so runs of spaces, ``"\\n\\n"`` and a quote after a space split differently from the
model's own tokenizer (570 of 927 standard-library docstrings tokenized differently). `GGUFTokenizer`
runs the exact tokenizer eagerly and, in a graph (`tf.data`, `tf.function`), through
`tf.numpy_function`: the same ids either way.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import keras
import numpy as np

try:
    from keras_hub.tokenizers import Tokenizer as _HubTokenizer
except ImportError:  # pragma: no cover - keras-hub is an optional extra
    _HubTokenizer = keras.layers.Layer

from tf_lora.interop.gguf_vocab import (  # noqa: F401  (re-exported)
    PRE_TOKENIZER_SPLITS,
    TOKENIZER_FILE,
    build_tokenizer,
    bytes_to_unicode,
)


def _to_texts(inputs) -> Tuple[List[str], bool]:
    """Python strings of a str / bytes / list / NumPy / eager tensor input, and whether it was a batch."""
    if isinstance(inputs, (str, bytes)):
        inputs, batched = [inputs], False
    elif isinstance(inputs, (list, tuple)):
        batched = True
    else:
        array = np.asarray(inputs.numpy() if hasattr(inputs, "numpy") else inputs)
        if array.ndim > 1:
            raise ValueError(f"`tokenize()` takes a string or a 1-D batch of strings. Received shape {array.shape}.")
        batched = array.ndim == 1
        inputs = array.reshape(-1).tolist()
    texts = []
    for text in inputs:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        if not isinstance(text, str):
            raise TypeError(f"`tokenize()` takes strings. Received an element of type {type(text).__name__}.")
        texts.append(text)
    return texts, batched


@keras.saving.register_keras_serializable(package="tf_lora")
class GGUFTokenizer(_HubTokenizer):
    """A KerasHub tokenizer for a GGUF file's vocabulary, tokenizing exactly as its reference tokenizer.

    Works eagerly, inside `tf.data` pipelines and `tf.function` (through `tf.numpy_function`), and
    inside KerasHub preprocessors (`CausalLMPreprocessor`): it has the `start_token_id`,
    `end_token_id` and `pad_token_id` they use. The tokenizer definition is saved as the asset
    ``tokenizer.json`` (a `tokenizers` file), so `.keras` files and presets round-trip.

    Args:
        tokenizer_json: The `tokenizers` JSON definition (`build_tokenizer(...).to_str()`); `None`
            when it comes later from `load_assets`.
        bos_token: The start token (`None` if the vocabulary has none).
        eos_token: The end token.
        pad_token: The file's padding token. Padded positions are masked, so `pad_token_id` is
            this token's id unless it is a stop token (KerasHub's samplers would stop on the
            padding), then the lowest id that is not.
        eot_token: A second end-of-turn token generation also stops on (`None` if none).
        chat_template: The Jinja chat template string of the file (`None` if none).
        add_bos: Whether the reference tokenizer prepends `bos_token` to a text.
        sequence_length: If set, outputs are padded / truncated to this length.
        **kwargs: Layer arguments (`name`, `dtype`: the id dtype, int32 by default).

    Example:
        >>> tok = tf_lora.load_gguf("model.gguf").preprocessor.tokenizer  # doctest: +SKIP
        >>> tok(["def f(x):\\n    return x"])  # doctest: +SKIP
    """

    def __init__(self, tokenizer_json: Optional[str] = None, bos_token: Optional[str] = None,
                 eos_token: Optional[str] = None, pad_token: Optional[str] = None,
                 eot_token: Optional[str] = None, chat_template: Optional[str] = None,
                 add_bos: bool = False, sequence_length: Optional[int] = None, **kwargs):
        kwargs.setdefault("dtype", "int32")
        super().__init__(**kwargs)
        self.bos_token, self.eos_token, self.pad_token, self.eot_token = bos_token, eos_token, pad_token, eot_token
        self.chat_template = chat_template
        self.add_bos = bool(add_bos)
        self.sequence_length = sequence_length
        self.file_assets = [TOKENIZER_FILE]
        self._tokenizer = None
        if tokenizer_json is not None:
            self._set_tokenizer(tokenizer_json)

    # --- state ---------------------------------------------------------------------------------
    def _set_tokenizer(self, tokenizer_json: str) -> None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(tokenizer_json)
        for token in (self.bos_token, self.eos_token, self.pad_token, self.eot_token):
            if token is not None and tok.token_to_id(token) is None:
                raise ValueError(f"The special token {token!r} is not in the vocabulary.")
        self._tokenizer = tok
        # KerasHub's preprocessors prepend `start_token_id` whenever it is set (`generate_preprocess`
        # ignores `add_start_token`), so it is set only where the reference tokenizer adds a BOS.
        self.start_token_id = None
        # KerasHub's generate stops on end_token_id and, where the attribute exists, end_token2_id.
        start = self.bos_token if self.add_bos else None
        for token, attr in ((start, "start_token"), (self.eos_token, "end_token"), (self.eot_token, "end_token2")):
            if token is not None and attr not in getattr(self, "_special_token_attrs", ()):
                self._add_special_token(token, attr)
        # Padding must not be a stop token: KerasHub's samplers stop as soon as any position after
        # the prompt holds one, padding included (SmolLM2's file pads with its end token).
        stops = {tok.token_to_id(t) for t in (self.eos_token, self.eot_token) if t is not None}
        pad = tok.token_to_id(self.pad_token) if self.pad_token is not None else None
        self.pad_token_id = pad if pad is not None and pad not in stops else min(set(range(len(stops) + 1)) - stops)

    def _ready(self):
        if self._tokenizer is None:
            raise ValueError("This GGUFTokenizer has no vocabulary yet (its tokenizer.json asset was not loaded).")
        return self._tokenizer

    def save_assets(self, dir_path: str) -> None:
        path = os.path.join(dir_path, TOKENIZER_FILE)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self._ready().to_str())

    def load_assets(self, dir_path: str) -> None:
        with open(os.path.join(dir_path, TOKENIZER_FILE), encoding="utf-8") as f:
            self._set_tokenizer(f.read())

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(bos_token=self.bos_token, eos_token=self.eos_token, pad_token=self.pad_token,
                      eot_token=self.eot_token, chat_template=self.chat_template, add_bos=self.add_bos,
                      sequence_length=self.sequence_length)
        return config

    # --- vocabulary ----------------------------------------------------------------------------
    def vocabulary_size(self) -> int:
        return self._ready().get_vocab_size(with_added_tokens=True)

    def get_vocabulary(self) -> List[str]:
        tok = self._ready()
        return [tok.id_to_token(i) for i in range(self.vocabulary_size())]

    def id_to_token(self, id: int) -> str:
        token = self._ready().id_to_token(int(id))
        if token is None:
            raise ValueError(f"`id` must be in [0, {self.vocabulary_size() - 1}]. Received: id={id}")
        return token

    def token_to_id(self, token: str) -> int:
        index = self._ready().token_to_id(token)
        if index is None:
            raise ValueError(f"Token {token!r} is not in the vocabulary.")
        return index

    # --- encode / decode -----------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> List[List[int]]:
        """Token ids of each text (no special tokens added), exactly as the reference tokenizer."""
        return [e.ids for e in self._ready().encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[Sequence[int]]) -> List[str]:
        """The text of each id sequence (special tokens kept, as transformers' `decode`)."""
        return self._ready().decode_batch([[int(i) for i in row] for row in ids], skip_special_tokens=False)

    def _encode_flat(self, texts: np.ndarray):
        ids = self.encode([t.decode("utf-8") for t in texts.reshape(-1).tolist()])
        flat = np.fromiter((i for row in ids for i in row), dtype=np.int32)
        return flat, np.array([len(row) for row in ids], dtype=np.int64)

    def _decode_flat(self, values: np.ndarray, lengths: np.ndarray):
        rows = np.split(values.astype(np.int64), np.cumsum(lengths)[:-1]) if len(lengths) else []
        return np.array([s.encode("utf-8") for s in self.decode(rows)], dtype=object)

    def tokenize(self, inputs):
        """Token ids: a 1-D array for one string, a ragged batch (lists / `tf.RaggedTensor`) for a batch."""
        import tensorflow as tf

        self._ready()
        if not tf.executing_eagerly():
            return self._tokenize_graph(tf, inputs)
        texts, batched = _to_texts(inputs)
        ids = self.encode(texts)
        dtype = keras.backend.standardize_dtype(self.compute_dtype)
        if self.sequence_length:
            dense = np.full((len(ids), self.sequence_length), self.pad_token_id, dtype=dtype)
            for row, seq in zip(dense, ids):
                row[:min(len(seq), self.sequence_length)] = seq[:self.sequence_length]
            return dense if batched else dense[0]
        return ids if batched else np.asarray(ids[0], dtype=dtype)

    def _tokenize_graph(self, tf, inputs):
        inputs = tf.convert_to_tensor(inputs)
        if inputs.dtype != tf.string or inputs.shape.rank not in (0, 1):
            raise ValueError(
                f"`tokenize()` takes a string tensor of rank 0 or 1. Received: dtype={inputs.dtype}, "
                f"shape={inputs.shape}"
            )
        flat, lengths = tf.numpy_function(self._encode_flat, [tf.reshape(inputs, [-1])], [tf.int32, tf.int64],
                                          stateful=False, name="gguf_tokenize")
        flat.set_shape([None])
        lengths.set_shape([None])
        ragged = tf.RaggedTensor.from_row_lengths(tf.cast(flat, self.compute_dtype), lengths, validate=False)
        if self.sequence_length:
            ragged = ragged.to_tensor(default_value=self.pad_token_id, shape=[None, self.sequence_length])
        return ragged[0] if inputs.shape.rank == 0 else ragged

    def detokenize(self, inputs):
        """Text of token ids: a string for one sequence, a list (or string tensor in a graph) for a batch."""
        import tensorflow as tf

        self._ready()
        if not tf.executing_eagerly():
            ids = inputs if isinstance(inputs, tf.RaggedTensor) else tf.convert_to_tensor(inputs)
            unbatched = ids.shape.rank == 1
            if not isinstance(ids, tf.RaggedTensor):
                ids = tf.RaggedTensor.from_tensor(ids[None] if unbatched else ids)
            text = tf.numpy_function(self._decode_flat, [tf.cast(ids.flat_values, tf.int64), ids.row_lengths()],
                                     tf.string, stateful=False, name="gguf_detokenize")
            text.set_shape([None])
            return text[0] if unbatched else text
        if isinstance(inputs, tf.RaggedTensor):
            inputs = inputs.to_list()
        elif hasattr(inputs, "numpy") or isinstance(inputs, np.ndarray) or keras.ops.is_tensor(inputs):
            inputs = np.asarray(keras.ops.convert_to_numpy(inputs)).tolist()
        if isinstance(inputs, (int, np.integer)):
            return self.decode([[inputs]])[0]
        if not inputs or not isinstance(inputs[0], (list, tuple)):
            return self.decode([list(inputs)])[0]
        return self.decode(inputs)

    @classmethod
    def from_metadata(cls, metadata: Dict[str, Any], **kwargs) -> "GGUFTokenizer":
        """The tokenizer of a GGUF file's metadata (see `build_tokenizer`)."""
        tok = build_tokenizer(metadata)
        tokens = metadata["tokenizer.ggml.tokens"]

        def token(key):
            index = metadata.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None

        eos, eot = token("eos"), token("eot")
        add_bos = metadata.get("tokenizer.ggml.add_bos_token", metadata.get("tokenizer.ggml.model") == "llama")
        return cls(tokenizer_json=tok.to_str(), bos_token=token("bos"), eos_token=eos, pad_token=token("padding"),
                   eot_token=eot if eot != eos else None, chat_template=metadata.get("tokenizer.chat_template"),
                   add_bos=bool(add_bos) and token("bos") is not None, **kwargs)

