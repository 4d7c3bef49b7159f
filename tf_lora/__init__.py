"""tf_lora: parameter-efficient fine-tuning (LoRA, QLoRA) for Keras 3 / TensorFlow."""

__version__ = "0.1.0"

__all__ = ["__version__"]
