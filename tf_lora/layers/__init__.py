"""tf_lora layers: LoRA adapters (and, in sibling modules, QLoRA and attention)."""

from tf_lora.layers.lora import LoRADense, LoRAEinsumDense, LoRALayer

__all__ = ["LoRADense", "LoRAEinsumDense", "LoRALayer"]
