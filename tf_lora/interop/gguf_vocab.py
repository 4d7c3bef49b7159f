"""The `tokenizers.Tokenizer` a GGUF file's metadata describes, built piece by piece the way
transformers builds its tokenizer from the same file (see `tf_lora.interop.gguf_tokenizer`,
which wraps it as a KerasHub tokenizer)."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4
# Split regexes transformers uses for these tokenizer.ggml.pre values (gguf_tokenizer_mapping.py);
# any other value keeps the byte-level pre-tokenizer's own GPT-2 regex, as there.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}
# Special tokens the transformers tokenizer class of each kind registers by default.
_CLASS_SPECIALS = {"gpt2": ("<|endoftext|>",), "llama": ("<unk>", "<s>", "</s>"),
                   "gemma": ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")}
TOKENIZER_FILE = "tokenizer.json"


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE spells every byte with one)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for byte in range(256):
        if byte not in keep:
            keep.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def _merges_from_scores(vocab: Dict[str, int], scores: Dict[str, float]) -> List[Tuple[str, str]]:
    """Merges a SentencePiece vocabulary implies: every split of a token into two tokens, best score first
    (transformers' `generate_merges`, the same order)."""
    merges = []
    for token, score in scores.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _kind(metadata: Dict[str, Any]) -> str:
    model = metadata.get("tokenizer.ggml.model")
    if model == "gpt2":
        return "gpt2"
    if model == "llama":
        return "gemma" if str(metadata.get("general.architecture", "")).startswith("gemma") else "llama"
    raise NotImplementedError(
        f"tokenizer.ggml.model is {model!r}; tf_lora builds 'gpt2' (byte-level BPE) and 'llama' "
        "(SentencePiece BPE) tokenizers."
    )


def build_tokenizer(metadata: Dict[str, Any]):
    """A `tokenizers.Tokenizer` equal to the one transformers builds from the same GGUF metadata.

    Args:
        metadata: The file's metadata (`GGUFFile.metadata`).

    Returns:
        The tokenizer; it adds no special tokens itself (the KerasHub preprocessor adds BOS/EOS).

    Raises:
        NotImplementedError: A tokenizer model other than ``gpt2`` / ``llama``.
        ValueError: Missing or inconsistent vocabulary metadata.
    """
    try:
        return _build(metadata)
    except (ValueError, NotImplementedError):
        raise
    except Exception as err:  # the `tokenizers` library raises plain Exceptions (a merge of unknown tokens)
        raise ValueError(f"The tokenizer.ggml.* metadata do not form a valid vocabulary: {err}") from err


def _build(metadata: Dict[str, Any]):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    kind = _kind(metadata)
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ValueError("tokenizer.ggml.tokens is missing or is not a list of strings.")
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens.")
    merges = metadata.get("tokenizer.ggml.merges")
    if merges is not None:
        merges = [tuple(m.split(" ", 1)) for m in merges]
        if any(len(m) != 2 for m in merges):
            raise ValueError("tokenizer.ggml.merges has an entry without a space between its two tokens.")

    if kind == "gpt2":
        spelling = bytes_to_unicode()
        alphabet = set(spelling.values())
        vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
                 for i, t in enumerate(tokens)}
        model = models.BPE(vocab=vocab, merges=merges or [], dropout=None, continuing_subword_prefix="",
                           end_of_word_suffix="", fuse_unk=False)
        tok = Tokenizer(model)
        split = PRE_TOKENIZER_SPLITS.get(metadata.get("tokenizer.ggml.pre"))
        if split is None:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
        tok.decoder = decoders.ByteLevel()
    else:
        if kind == "gemma":  # a token of spaces is stored with real spaces; merges follow file order
            tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        vocab = {t: i for i, t in enumerate(tokens)}
        if merges is None:
            if kind == "gemma":
                scores = {t: -i for i, t in enumerate(tokens)}
            else:
                raw = metadata.get("tokenizer.ggml.scores")
                if raw is None or len(raw) != len(tokens):
                    raise ValueError("A 'llama' tokenizer needs tokenizer.ggml.merges or one score per token.")
                scores = dict(zip(tokens, raw))
            merges = _merges_from_scores(vocab, scores)
        if kind == "gemma":
            tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token="<unk>",
                                       dropout=None, byte_fallback=True))
            tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
            tok.normalizer = normalizers.Replace(" ", "\u2581")
            tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        else:
            tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
            tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                             decoders.Fuse(), decoders.Strip(content=" ", left=1)])

    # Special tokens stay whole in text: the class defaults, the file's control tokens (in a
    # byte-level vocabulary only those spelled in the byte alphabet), and its BOS/EOS/UNK/PAD.
    known = tok.get_vocab()
    spelled = set(bytes_to_unicode().values()) if kind == "gpt2" else None
    special = [t for t in _CLASS_SPECIALS[kind] if t in known]
    special += [t for t, k in zip(tokens, types) if k == _CONTROL and (spelled is None or set(t) <= spelled)]
    for key in ("bos", "eos", "unknown", "padding"):
        index = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(index, int) and 0 <= index < len(tokens):
            special.append(tokens[index])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(special)])
    user = [t for t, k in zip(tokens, types) if k == _USER_DEFINED and t in known]
    if user:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return tok
