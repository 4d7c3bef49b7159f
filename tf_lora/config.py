"""Configuration objects: `LoRAConfig` and `QLoRAConfig`.

Both are frozen dataclasses validated on construction: a bad value raises at
once, naming the field, what was expected and what was received. They are
never mutated afterwards; use `dataclasses.replace` to derive a new one.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from typing import Any, Mapping, Optional, Sequence, Union

_INITS = ("he_uniform", "gaussian", "pissa", "olora", "loftq")
# Inits that rewrite the frozen base (it becomes a residual); see tf_lora/variants.py.
BASE_REWRITING_INITS = ("pissa", "olora", "loftq")
_ATTENTION = (None, "chunked")


def _invalid(name: str, expected: str, value: Any) -> str:
    return (
        f"Received an invalid value for `{name}`, expected {expected}. "
        f"Received: {name}={value!r}"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_patterns(name: str, value: Any) -> str:
    """Validates a `target_modules`-style selector; returns its kind."""
    if isinstance(value, str):
        if value == "all-linear":
            return "all-linear"
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(
                _invalid(name, f"a valid regular expression ({e})", value)
            ) from None
        return "regex"
    if isinstance(value, Sequence) and all(isinstance(v, str) and v for v in value):
        return "names"
    raise TypeError(
        _invalid(
            name,
            "a sequence of non-empty layer names, a regex string or 'all-linear'",
            value,
        )
    )


def matches(selector: Union[str, Sequence[str]], name: str, path: str) -> bool:
    """The one matching rule shared by `target_modules`, `exclude_modules` and
    `modules_to_save`.

    A sequence of names matches a layer when one of them is contained in the
    layer's own name; a string is a regular expression that must match the
    layer's whole path (e.g. ``"encoder/block_0/mha/query"``); ``"all-linear"``
    matches every layer.
    """
    if isinstance(selector, str):
        if selector == "all-linear":
            return True
        return re.fullmatch(selector, path) is not None
    return any(s in name for s in selector)


def _pattern_lookup(patterns: Mapping[str, Any], name: str, path: str) -> Any:
    """The value of the most specific key of `patterns` for this layer (None: no key applies).

    1. a key equal to the layer's whole path, else one equal to its own name;
    2. else the first key (in the mapping's order) that, as a regex, fully matches the path;
    3. else the longest key contained in the layer's own name (the first of equal length).
    """
    for exact in (path, name):
        if exact in patterns:
            return patterns[exact]
    for key, value in patterns.items():
        if re.fullmatch(key, path):
            return value
    contained = [key for key in patterns if key in name]
    return patterns[max(contained, key=len)] if contained else None


@dataclasses.dataclass(frozen=True)
class QLoRAConfig:
    """How the frozen base weights are quantized (QLoRA).

    Args:
        bits: Bits per base weight. Only 4 is supported.
        quant_type: Only ``"nf4"`` (4-bit NormalFloat, as bitsandbytes).
        group_size: Consecutive weights sharing one absmax scale (bitsandbytes'
            blocksize), 64 by default.
        double_quant: Quantize the per-group scales again to 8 bits
            (about 4.127 instead of 4.5 bits per parameter).
        fake_quant: Keep a float kernel and quantize->dequantize it in the
            forward pass with a straight-through gradient (quantization-aware
            fine-tuning) instead of storing 4-bit codes.
        compute_dtype: dtype the base kernel is dequantized to inside `call`;
            `None` uses the layer's compute dtype.

    Example:
        >>> cfg = QLoRAConfig(group_size=64)
        >>> cfg.double_quant
        True
    """

    bits: int = 4
    quant_type: str = "nf4"
    group_size: int = 64
    double_quant: bool = True
    fake_quant: bool = False
    compute_dtype: Optional[str] = None

    def __post_init__(self):
        if not _is_int(self.bits):
            raise TypeError(_invalid("bits", "the integer 4", self.bits))
        if self.bits != 4:
            raise NotImplementedError(_invalid("bits", "4 (only 4-bit NF4 is supported)", self.bits))
        if self.quant_type != "nf4":
            raise ValueError(_invalid("quant_type", "'nf4'", self.quant_type))
        if not _is_int(self.group_size):
            raise TypeError(_invalid("group_size", "a positive integer", self.group_size))
        if self.group_size <= 0:
            raise ValueError(_invalid("group_size", "a positive integer", self.group_size))
        for flag in ("double_quant", "fake_quant"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(_invalid(flag, "a bool", getattr(self, flag)))
        if self.compute_dtype is not None and self.compute_dtype not in (
            "float32", "float16", "bfloat16"
        ):
            raise ValueError(
                _invalid("compute_dtype", "None, 'float32', 'float16' or 'bfloat16'", self.compute_dtype)
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QLoRAConfig":
        return cls(**dict(data))


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """What to adapt and how.

    Args:
        rank: LoRA rank r (a positive integer).
        alpha: LoRA alpha; the LoRA path is scaled by ``alpha / rank``
            (``alpha / sqrt(rank)`` with `use_rslora`).
        dropout: Dropout rate on the LoRA path's input, in [0, 1).
        target_modules: Which adaptable layers (Dense, EinsumDense) get
            adapters: a sequence of names (a name matches when it is contained
            in the layer's own name), a regex string (full match against the
            layer's path, e.g. ``".*/query"``) or ``"all-linear"``.
        exclude_modules: Layers never adapted (same matching rule).
        modules_to_save: Layers trained fully, e.g. a new classifier head
            (same matching rule). They are never adapted.
        use_rslora: Scale by ``alpha / sqrt(rank)`` (rank-stabilized LoRA).
        init: ``"he_uniform"`` (default) or ``"gaussian"`` (normal, std 1/rank)
            for `lora_a`, with `lora_b` at zero; or an init that rewrites the
            frozen base so that outputs still equal the base model's:
            ``"pissa"`` (A, B from the top-r SVD of W, base W - s*A@B),
            ``"olora"`` (from a QR of W, as PEFT) or, with `quantization` only,
            ``"loftq"`` (alternating NF4 quantization and rank-r SVD, see
            `loftq_iter`). `tf_lora.save_adapter` converts such adapters so
            that they apply to the original base (see its `to_original_base`).
            As in PEFT, such a model inside `disable_adapter` computes the
            residual base, not the original one.
        use_dora: Weight-decomposed LoRA (DoRA, Liu et al. 2024): a trainable
            magnitude per output unit, ``lora_magnitude``, times the direction
            ``(W + s*A@B) / ||W + s*A@B||`` (norm over the input axes, held
            constant in the backward pass, as PEFT).
        gradient_checkpointing: Recompute each transformer block's forward in the backward
            pass instead of storing its activations (`tf_lora.enable_gradient_checkpointing`).
        loftq_iter: Alternations of ``init="loftq"`` (a positive integer, 1 as PEFT's default).
        rank_pattern: Per-layer ranks, ``{key: rank}``. A key is a layer name
            or a regex; when several apply, the most specific wins: a key equal
            to the layer's whole path, then one equal to its own name, then
            the first key (in order) that fully matches the path as a regex,
            then the longest key contained in the layer's own name. So with
            ``{"query": 3, "query_norm": 5}`` the layer ``query_norm`` gets 5.
        alpha_pattern: Per-layer alphas, same keys and rule as `rank_pattern`.
        quantization: A `QLoRAConfig` to store the base weights in NF4.
        attention: ``"chunked"`` switches the adapted model's attention layers
            (MultiHeadAttention and KerasHub decoders' attention) to exact chunked
            attention, as `tf_lora.use_chunked_attention`; `None` keeps them.
        max_attention_memory: Memory budget in bytes for one chunked
            attention score tile (only with ``attention="chunked"``).
        loss: ``"chunked"`` trains a KerasHub CausalLM with the chunked LM loss
            (`tf_lora.use_chunked_loss`: token cross-entropy without the full
            logits); `None` keeps the model's loss.
        max_loss_memory: Memory budget in bytes for one chunk's float32 logits
            (only with ``loss="chunked"``).

    Example:
        >>> cfg = LoRAConfig(rank=4, target_modules=("query", "value"))
        >>> cfg.scaling_for(4, 32.0)
        8.0
    """

    rank: int = 8
    alpha: float = 32
    dropout: float = 0.1
    target_modules: Union[str, Sequence[str]] = ("query", "key", "value")
    exclude_modules: Union[str, Sequence[str]] = ()
    modules_to_save: Union[str, Sequence[str]] = ()
    use_rslora: bool = False
    init: str = "he_uniform"
    use_dora: bool = False
    loftq_iter: int = 1
    gradient_checkpointing: bool = False
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    quantization: Optional[QLoRAConfig] = None
    attention: Optional[str] = None
    max_attention_memory: Optional[int] = None
    loss: Optional[str] = None
    max_loss_memory: Optional[int] = None

    def __post_init__(self):
        _check_rank("rank", self.rank)
        _check_alpha("alpha", self.alpha)
        if not _is_number(self.dropout):
            raise TypeError(_invalid("dropout", "a float in [0, 1)", self.dropout))
        if not 0.0 <= float(self.dropout) < 1.0 or math.isnan(self.dropout):
            raise ValueError(_invalid("dropout", "a float in [0, 1)", self.dropout))
        for field in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, field)
            kind = _check_patterns(field, value)
            if kind == "names":
                object.__setattr__(self, field, tuple(value))
            if kind == "all-linear" and field != "target_modules":
                raise ValueError(_invalid(field, "layer names or a regex ('all-linear' is only for target_modules)", value))
        if isinstance(self.target_modules, tuple) and not self.target_modules:
            raise ValueError(_invalid("target_modules", "at least one layer name", self.target_modules))
        if not isinstance(self.use_rslora, bool):
            raise TypeError(_invalid("use_rslora", "a bool", self.use_rslora))
        if self.init not in _INITS:
            raise ValueError(_invalid("init", f"one of {_INITS}", self.init))
        if not isinstance(self.use_dora, bool):
            raise TypeError(_invalid("use_dora", "a bool", self.use_dora))
        if not isinstance(self.gradient_checkpointing, bool):
            raise TypeError(_invalid("gradient_checkpointing", "a bool", self.gradient_checkpointing))
        if not _is_int(self.loftq_iter):
            raise TypeError(_invalid("loftq_iter", "a positive integer", self.loftq_iter))
        if self.loftq_iter <= 0:
            raise ValueError(_invalid("loftq_iter", "a positive integer", self.loftq_iter))
        for field, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_alpha)):
            value = getattr(self, field)
            if not isinstance(value, Mapping):
                raise TypeError(_invalid(field, "a mapping of layer name/regex to value", value))
            for key, v in value.items():
                if not isinstance(key, str) or not key:
                    raise TypeError(_invalid(field, "non-empty string keys", value))
                try:
                    re.compile(key)
                except re.error as e:
                    raise ValueError(
                        _invalid(field, f"keys that are layer names or valid regular expressions ({e})", value)
                    ) from None
                check(f"{field}[{key!r}]", v)
            object.__setattr__(self, field, types.MappingProxyType(dict(value)))
        if self.quantization is not None and not isinstance(self.quantization, QLoRAConfig):
            raise TypeError(_invalid("quantization", "None or a tf_lora.QLoRAConfig", self.quantization))
        if self.init == "loftq" and self.quantization is None:
            raise ValueError(_invalid(
                "init", "'loftq' only together with quantization=tf_lora.QLoRAConfig() (LoftQ initializes "
                "the adapter from the NF4 quantization error); without quantization use 'pissa'", self.init))
        if self.attention not in _ATTENTION:
            raise ValueError(_invalid("attention", "None or 'chunked'", self.attention))
        if self.max_attention_memory is not None:
            if not _is_int(self.max_attention_memory) or self.max_attention_memory <= 0:
                raise ValueError(_invalid("max_attention_memory", "None or a positive number of bytes", self.max_attention_memory))
            if self.attention != "chunked":
                raise ValueError(_invalid("max_attention_memory", "None unless attention='chunked'", self.max_attention_memory))
        if self.loss not in _ATTENTION:
            raise ValueError(_invalid("loss", "None or 'chunked'", self.loss))
        if self.max_loss_memory is not None:
            if not _is_int(self.max_loss_memory) or self.max_loss_memory <= 0:
                raise ValueError(_invalid("max_loss_memory", "None or a positive number of bytes", self.max_loss_memory))
            if self.loss != "chunked":
                raise ValueError(_invalid("max_loss_memory", "None unless loss='chunked'", self.max_loss_memory))

    # -- per-layer values -------------------------------------------------
    def rank_for(self, name: str, path: str) -> int:
        """The rank for the layer with this own name and path (`rank_pattern`'s
        most specific key, else `rank`)."""
        value = _pattern_lookup(self.rank_pattern, name, path)
        return self.rank if value is None else int(value)

    def alpha_for(self, name: str, path: str) -> float:
        """The alpha for the layer with this own name and path (`alpha_pattern`'s
        most specific key, else `alpha`)."""
        value = _pattern_lookup(self.alpha_pattern, name, path)
        return float(self.alpha if value is None else value)

    def scaling_for(self, rank: int, alpha: float) -> float:
        """``alpha / rank`` (or ``alpha / sqrt(rank)`` with `use_rslora`)."""
        return float(alpha) / (math.sqrt(rank) if self.use_rslora else rank)

    # -- serialization ----------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-compatible dict; `from_dict` inverts it."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            elif isinstance(value, QLoRAConfig):
                value = value.to_dict()
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoRAConfig":
        if not isinstance(data, Mapping):
            raise TypeError(_invalid("data", "a mapping from LoRAConfig.to_dict()", data))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(_invalid("data", f"only LoRAConfig fields {sorted(known)}", unknown))
        kwargs = dict(data)
        for field in ("target_modules", "exclude_modules", "modules_to_save"):
            if isinstance(kwargs.get(field), list):
                kwargs[field] = tuple(kwargs[field])
        if isinstance(kwargs.get("quantization"), Mapping):
            kwargs["quantization"] = QLoRAConfig.from_dict(kwargs["quantization"])
        return cls(**kwargs)


def _check_rank(name: str, value: Any) -> None:
    if not _is_int(value):
        raise TypeError(_invalid(name, "a positive integer", value))
    if value <= 0:
        raise ValueError(_invalid(name, "a positive integer", value))


def _check_alpha(name: str, value: Any) -> None:
    if not _is_number(value):
        raise TypeError(_invalid(name, "a positive finite number", value))
    if not value > 0 or math.isinf(value):
        raise ValueError(_invalid(name, "a positive finite number", value))
