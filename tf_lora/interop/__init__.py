"""Bridges between tf_lora / KerasHub and other formats: Hugging Face PEFT directories
(`peft`, `peft_export`, `peft_files`, `peft_fused`, `peft_maps`, `peft_saved`) and GGUF
checkpoints (`gguf`, `gguf_archs`, `gguf_file`, `gguf_tokenizer`). Depends on the core,
never the reverse: the core's `save_adapter(format="peft")` and `load_adapter(directory)`
reach the PEFT reader and writer through `tf_lora.adapter_files.register_directory_format`.
The GGUF modules import `gguf` and `tokenizers` and are loaded on first use.
"""

from tf_lora.adapter_files import register_directory_format
from tf_lora.interop.peft import from_peft, load_peft
from tf_lora.interop.peft_export import save_peft

register_directory_format("peft", save=save_peft, load=load_peft)

__all__ = ["from_peft", "load_peft", "save_peft"]
