"""Bridges between tf_lora / KerasHub and other formats (GGUF). Depends on the core, never the reverse."""
