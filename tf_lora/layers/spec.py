"""The hyper-parameters of one adapter: validation, scaling and the names of the inits."""

from __future__ import annotations

import math
from typing import Any

_INITS = ("he_uniform", "gaussian", "pissa", "olora", "loftq")
BASE_REWRITING_INITS = ("pissa", "olora", "loftq")  # the frozen base becomes a residual
DEFAULT_ADAPTER = "default"


def _invalid(name: str, expected: str, value: Any) -> str:
    return (
        f"Received an invalid value for `{name}`, expected {expected}. "
        f"Received: {name}={value!r}"
    )


def _adapter_spec(rank=8, alpha=32.0, dropout=0.0, use_rslora=False, lora_init="he_uniform",
                  use_dora=False) -> dict:
    """Validated hyper-parameters of one adapter."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(_invalid("rank", "a positive integer", rank))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(_invalid("alpha", "a positive number", alpha))
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(_invalid("dropout", "a float in [0, 1)", dropout))
    if lora_init not in _INITS:
        raise ValueError(_invalid("lora_init", f"one of {_INITS}", lora_init))
    if not isinstance(use_dora, bool):
        raise TypeError(_invalid("use_dora", "a bool", use_dora))
    return {"rank": rank, "alpha": float(alpha), "dropout": float(dropout),
            "use_rslora": bool(use_rslora), "lora_init": lora_init, "use_dora": use_dora}


def _scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if use_rslora else rank)
