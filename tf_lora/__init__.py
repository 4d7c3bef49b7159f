"""tf_lora: parameter-efficient fine-tuning (LoRA, QLoRA) for Keras 3 / TensorFlow.

Example:
    >>> import tf_lora
    >>> model = tf_lora.adapt(base_model, tf_lora.LoRAConfig(rank=8))  # doctest: +SKIP
"""

__version__ = "0.1.0"

from tf_lora import distribute, nf4
from tf_lora.adapt import adapt, register_adapter
from tf_lora.adapters import (
    ParameterCount,
    count_parameters,
    load_adapter,
    merge,
    print_trainable_parameters,
    read_adapter_config,
    save_adapter,
)
from tf_lora.config import LoRAConfig, QLoRAConfig
from tf_lora.convert import use_chunked_attention
from tf_lora.distribute import BackupAndRestore, is_chief, multi_worker_strategy
from tf_lora.layers.attention import ChunkedAttention
from tf_lora.layers.chunked_op import chunked_attention
from tf_lora.layers.lora import LoRADense, LoRAEinsumDense, LoRALayer
from tf_lora.layers.qlora import QLoRADense, QLoRAEinsumDense
from tf_lora.memory import memory_report, print_memory_report
from tf_lora.multi_adapter import add_adapter, delete_adapter, disable_adapter, set_adapter
from tf_lora.train import AdaptedModel, LoRAModel

__all__ = sorted(
    [
        "AdaptedModel",
        "BackupAndRestore",
        "ChunkedAttention",
        "LoRAConfig",
        "LoRADense",
        "LoRAEinsumDense",
        "LoRALayer",
        "LoRAModel",
        "ParameterCount",
        "QLoRAConfig",
        "QLoRADense",
        "QLoRAEinsumDense",
        "__version__",
        "adapt",
        "chunked_attention",
        "add_adapter",
        "delete_adapter",
        "distribute",
        "disable_adapter",
        "count_parameters",
        "is_chief",
        "load_adapter",
        "memory_report",
        "merge",
        "multi_worker_strategy",
        "nf4",
        "print_memory_report",
        "print_trainable_parameters",
        "read_adapter_config",
        "register_adapter",
        "save_adapter",
        "set_adapter",
        "use_chunked_attention",
    ]
)
