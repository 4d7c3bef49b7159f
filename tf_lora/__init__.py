"""tf_lora: parameter-efficient fine-tuning (LoRA, QLoRA) for Keras 3 / TensorFlow.

Example:
    >>> import tf_lora
    >>> model = tf_lora.adapt(base_model, tf_lora.LoRAConfig(rank=8))  # doctest: +SKIP
"""

__version__ = "0.1.0"

from tf_lora import data, distribute, nf4
from tf_lora.adapt import adapt, register_adapter
from tf_lora.adapter_checkpoint import AdapterCheckpoint
from tf_lora.adapters import (
    ParameterCount,
    count_parameters,
    load_adapter,
    merge,
    print_trainable_parameters,
    read_adapter_config,
    save_adapter,
)
from tf_lora.checkpointing import checkpointed_blocks, disable_gradient_checkpointing, enable_gradient_checkpointing
from tf_lora.config import LoRAConfig, QLoRAConfig
from tf_lora.convert import use_chunked_attention
from tf_lora.loss import use_chunked_loss
from tf_lora.packing import enable_packing
from tf_lora.distribute import BackupAndRestore, is_chief, multi_worker_strategy
from tf_lora.layers.attention import ChunkedAttention
from tf_lora.layers.chunked_op import chunked_attention
from tf_lora.layers.conv import LoRAConv1D, LoRAConv2D, LoRAConv3D
from tf_lora.layers.embedding import LoRAEmbedding, LoRAReversibleEmbedding
from tf_lora.layers.lora import LoRADense, LoRAEinsumDense, LoRALayer
from tf_lora.layers.qlora import QLoRADense, QLoRAEinsumDense
from tf_lora.loraplus import loraplus_optimizer
from tf_lora.merging import add_weighted_adapter
from tf_lora.layers.qlora_conv_embedding import (
    QLoRAConv1D,
    QLoRAConv2D,
    QLoRAConv3D,
    QLoRAEmbedding,
    QLoRAReversibleEmbedding,
)
from tf_lora.memory import memory_report, print_memory_report
from tf_lora.interop import from_peft  # registers the PEFT directory format
from tf_lora.multi_adapter import add_adapter, delete_adapter, disable_adapter, set_adapter
from tf_lora.train import AdaptedModel, LoRAModel

__all__ = sorted(
    [
        "AdaptedModel",
        "AdapterCheckpoint",
        "BackupAndRestore",
        "ChunkedAttention",
        "LoRAConfig",
        "LoRAConv1D",
        "LoRAConv2D",
        "LoRAConv3D",
        "LoRADense",
        "LoRAEinsumDense",
        "LoRAEmbedding",
        "LoRALayer",
        "LoRAModel",
        "LoRAReversibleEmbedding",
        "ParameterCount",
        "QLoRAConfig",
        "QLoRAConv1D",
        "QLoRAConv2D",
        "QLoRAConv3D",
        "QLoRADense",
        "QLoRAEinsumDense",
        "QLoRAEmbedding",
        "QLoRAReversibleEmbedding",
        "__version__",
        "adapt",
        "checkpointed_blocks",
        "disable_gradient_checkpointing",
        "enable_gradient_checkpointing",
        "enable_packing",
        "add_weighted_adapter",
        "loraplus_optimizer",
        "chunked_attention",
        "add_adapter",
        "delete_adapter",
        "data",
        "distribute",
        "disable_adapter",
        "count_parameters",
        "from_peft",
        "is_chief",
        "load_gguf",
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
        "use_chunked_loss",
    ]
)


def __getattr__(name):
    # `load_gguf` is imported on first use, so `import tf_lora` needs neither `gguf` nor `tokenizers`.
    if name == "load_gguf":
        from tf_lora.interop.gguf import load_gguf

        return load_gguf
    raise AttributeError(f"module 'tf_lora' has no attribute {name!r}")
