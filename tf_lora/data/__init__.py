"""Datasets for CausalLM fine-tuning: JSONL and chat formats, completion-only loss, packing.

Example:
    >>> data = tf_lora.data.prepare("train.jsonl", causal_lm, sequence_length=1024, packing=True)  # doctest: +SKIP
    >>> causal_lm.fit(data.dataset(batch_size=8), epochs=1)                                        # doctest: +SKIP

Modules: `formats` (reading examples, one class per format), `chat_template` (Jinja chat
templates and the assistant's spans), `tokenize` (segments to ids and masks), `packing`
(truncation rule, first-fit-decreasing packing, rows) and `dataset` (`prepare`, the
`tf.data.Dataset`).
"""

from tf_lora.data.chat_template import ChatTemplate, read_chat_template
from tf_lora.data.dataset import CausalLMData, DataStats, causal_lm_dataset, prepare
from tf_lora.data.formats import ChatFormat, CompletionFormat, TextFormat, read_examples
from tf_lora.data.packing import first_fit_decreasing
from tf_lora.data.tokenize import TokenizerAdapter

__all__ = sorted([
    "CausalLMData",
    "ChatFormat",
    "ChatTemplate",
    "CompletionFormat",
    "DataStats",
    "TextFormat",
    "TokenizerAdapter",
    "causal_lm_dataset",
    "first_fit_decreasing",
    "prepare",
    "read_chat_template",
    "read_examples",
])
