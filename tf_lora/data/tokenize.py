"""Tokenizing segments of text whose tokens are trained or not.

An example arrives as segments ``[(text, trained), ...]``. Each segment is tokenized on
its own and the ids are concatenated, so no token straddles the boundary between a
prompt and a completion: the prompt's tokens are exactly those the model sees when it is
given that prompt to `generate` from, and the mask is exact by construction. Inside a
segment, the special-token strings (``"<|im_start|>"``, ``"<bos>"``...) are cut out and
mapped to their ids before the text between them is tokenized, as Hugging Face
tokenizers do; plain-text tokenizers never see them.
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

Segments = List[Tuple[str, bool]]


def _unwrap(tokenizer):
    """A CausalLM or a preprocessor gives its tokenizer."""
    preprocessor = getattr(tokenizer, "preprocessor", None)
    if preprocessor is not None and getattr(preprocessor, "tokenizer", None) is not None:
        return preprocessor.tokenizer
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and hasattr(inner, "tokenize"):
        return inner
    return tokenizer


def _is_keras_hub(tokenizer) -> bool:
    return hasattr(tokenizer, "tokenize") and hasattr(tokenizer, "token_to_id")


class TokenizerAdapter:
    """One interface over a KerasHub tokenizer or any callable ``str -> ids``.

    Args:
        tokenizer: A KerasHub tokenizer, or a model / preprocessor carrying one
            (``causal_lm.preprocessor.tokenizer`` is used), or a callable mapping a
            string to a sequence of int token ids.
        special_tokens: Strings cut out of the text and mapped to single ids: a dict
            ``{string: id}``, or (KerasHub tokenizers) a list of strings looked up with
            `token_to_id`. Default: a KerasHub tokenizer's `special_tokens` and
            `unsplittable_tokens`; none for a callable.
        bos_id, eos_id, pad_id: Start, end and padding ids. Default: a KerasHub
            tokenizer's `start_token_id`, `end_token_id` and `pad_token_id` (padding 0
            where it has none); `None`, `None` and 0 for a callable.
        bos_token, eos_token: The strings a chat template's ``bos_token`` /
            ``eos_token`` variables hold. Default: the tokenizer's `start_token` /
            `end_token` (KerasHub), else its `bos_token` / `eos_token`.
    """

    def __init__(self, tokenizer, special_tokens: Optional[Union[Mapping[str, int], Sequence[str]]] = None,
                 bos_id: Optional[int] = None, eos_id: Optional[int] = None, pad_id: Optional[int] = None,
                 bos_token: Optional[str] = None, eos_token: Optional[str] = None):
        tokenizer = _unwrap(tokenizer)
        self.tokenizer = tokenizer
        self.keras_hub = _is_keras_hub(tokenizer)
        if not self.keras_hub and not callable(tokenizer):
            raise TypeError("Received an invalid value for `tokenizer`, expected a KerasHub tokenizer, a CausalLM or "
                            f"preprocessor carrying one, or a callable str -> token ids. Received: {type(tokenizer).__name__}")
        hub = tokenizer if self.keras_hub else None
        self.bos_id = _id("bos_id", bos_id if bos_id is not None else getattr(hub, "start_token_id", None))
        self.eos_id = _id("eos_id", eos_id if eos_id is not None else getattr(hub, "end_token_id", None))
        pad = pad_id if pad_id is not None else getattr(hub, "pad_token_id", None)
        self.pad_id = _id("pad_id", 0 if pad is None else pad)
        # Chat templates' `bos_token` / `eos_token`: KerasHub's names, else Hugging Face's (a GGUF tokenizer
        # that adds no start token still carries the file's BOS string for templates that write it).
        self.bos_token = bos_token if bos_token is not None else (
            getattr(hub, "start_token", None) or getattr(hub, "bos_token", None) or "")
        self.eos_token = eos_token if eos_token is not None else (
            getattr(hub, "end_token", None) or getattr(hub, "eos_token", None) or "")
        self.special_tokens = self._specials(special_tokens, hub)
        names = sorted(self.special_tokens, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in names) + ")") if names else None

    def _specials(self, special_tokens, hub) -> Dict[str, int]:
        if isinstance(special_tokens, Mapping):
            return {str(k): _id("special_tokens", v) for k, v in special_tokens.items()}
        if special_tokens is None:
            if hub is None:
                return {}
            names = [t for t in list(getattr(hub, "special_tokens", None) or [])
                     + list(getattr(hub, "unsplittable_tokens", None) or []) if isinstance(t, str) and t]
        elif isinstance(special_tokens, (list, tuple, set)) and all(isinstance(t, str) for t in special_tokens):
            if hub is None:
                raise TypeError("Received an invalid value for `special_tokens`: with a callable tokenizer, expected a "
                                f"dict {{string: id}}. Received: special_tokens={special_tokens!r}")
            names = list(special_tokens)
        else:
            raise TypeError("Received an invalid value for `special_tokens`, expected a dict {string: id} or a list "
                            f"of strings. Received: special_tokens={special_tokens!r}")
        found = {}
        for name in names:
            try:
                token_id = hub.token_to_id(name)
            except (KeyError, ValueError):
                token_id = None
            if token_id is None:
                if special_tokens is not None:
                    raise ValueError(f"Received an invalid value for `special_tokens`: {name!r} is not in the "
                                     "tokenizer's vocabulary.")
                continue
            found[name] = int(token_id)
        return found

    # -- tokenizing ------------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> List[np.ndarray]:
        """Token ids of each text (special-token strings are not treated specially here)."""
        out: List[Optional[np.ndarray]] = [None] * len(texts)
        todo = [i for i, t in enumerate(texts) if t]
        for i, t in enumerate(texts):
            if not t:
                out[i] = np.zeros((0,), np.int32)
        if self.keras_hub:
            for begin in range(0, len(todo), 2048):
                chunk = todo[begin:begin + 2048]
                result = self.tokenizer.tokenize([texts[i] for i in chunk])
                # KerasHub returns a list of lists eagerly (a RaggedTensor in older versions).
                rows = result.to_list() if hasattr(result, "to_list") else result
                if not isinstance(rows, list) or len(rows) != len(chunk):
                    raise ValueError("Received an invalid value for `tokenizer`: it pads its output to a fixed "
                                     "length (a `sequence_length` is set); pass a tokenizer without one.")
                for i, row in zip(chunk, rows):
                    out[i] = np.asarray(row, np.int32)
        else:
            for i in todo:
                out[i] = _ids(self.tokenizer(texts[i]))
        return out  # type: ignore[return-value]

    def encode_segments(self, examples: Sequence[Segments]) -> List[Tuple[np.ndarray, np.ndarray]]:
        """``(ids, trained)`` for each example: its segments tokenized one by one (special
        tokens mapped to their ids) and concatenated; ``trained[i]`` is the segment's flag."""
        pieces: List[str] = []
        plans = []  # per example: [(kind, value, trained)], kind "t" = index in pieces, "s" = special id
        for segments in examples:
            plan = []
            for text, trained in segments:
                parts = self._split.split(text) if self._split is not None else [text]
                for k, part in enumerate(parts):
                    if k % 2 == 1:
                        plan.append(("s", self.special_tokens[part], trained))
                    elif part:
                        plan.append(("t", len(pieces), trained))
                        pieces.append(part)
            plans.append(plan)
        encoded = self.encode(pieces)
        out = []
        for plan in plans:
            ids, flags = [], []
            for kind, value, trained in plan:
                chunk = np.asarray([value], np.int32) if kind == "s" else encoded[value]
                ids.append(chunk)
                flags.append(np.full(len(chunk), trained, bool))
            out.append((np.concatenate(ids) if ids else np.zeros((0,), np.int32),
                        np.concatenate(flags) if flags else np.zeros((0,), bool)))
        return out


def _id(name: str, value) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"Received an invalid value for `{name}`, expected a non-negative int token id. "
                         f"Received: {name}={value!r}")
    return int(value)


def _ids(value) -> np.ndarray:
    if hasattr(value, "numpy"):
        value = value.numpy()
    array = np.asarray(value)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise ValueError("Received an invalid value for `tokenizer`: a callable tokenizer must return a 1-D sequence "
                         f"of int token ids. Received: an array of shape {array.shape} and dtype {array.dtype}")
    return array.astype(np.int32)
