"""Reading examples: JSONL files or lists of dicts, in three formats.

One small class per format (as mlx-lm's ``tuner/datasets.py``), chosen by the keys of
the first example:

- ``{"messages": [{"role": ..., "content": ...}, ...]}``: `ChatFormat`, rendered with
  the model's chat template; by default only the assistants' tokens are trained;
- ``{"prompt": ..., "completion": ...}``: `CompletionFormat`; by default only the
  completion's tokens are trained;
- ``{"text": ...}``: `TextFormat`; every token is trained.

Other keys are ignored. Each format turns an example into segments ``[(text, trained)]``
(see `tf_lora.data.tokenize`). A problem in an example raises a `ValueError` that names
where it is: ``line 7 of 'train.jsonl'`` or ``source[6]``.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, List, Optional, Sequence, Tuple

from tf_lora.data.chat_template import ChatTemplate

Segments = List[Tuple[str, bool]]


def read_examples(source) -> Tuple[List[dict], List[str]]:
    """``(examples, where)``: the examples of a JSONL file (blank lines skipped) or of a
    list of dicts, and where each one is (``"line 3 of 'x.jsonl'"`` / ``"source[2]"``).

    Raises:
        FileNotFoundError: no file at `source`.
        ValueError: a line that is not JSON, or not a JSON object (its line number is
            named); no examples at all.
        TypeError: `source` is neither a path nor a list of dicts.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Received an invalid value for `source`: no file at {path!r}.")
        examples, where = [], []
        for number, line in _lines(path):
            place = f"line {number} of {path!r}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"Received an invalid value for `source`: {place} is not valid JSON "
                                 f"({e.msg} at column {e.colno}).") from None
            if not isinstance(record, dict):
                raise ValueError(f"Received an invalid value for `source`: {place} is a JSON "
                                 f"{type(record).__name__}, expected an object such as {{\"text\": ...}}.")
            examples.append(record)
            where.append(place)
        if not examples:
            raise ValueError(f"Received an invalid value for `source`: {path!r} holds no examples (empty file).")
        return examples, where
    if isinstance(source, (list, tuple)):
        for i, record in enumerate(source):
            if not isinstance(record, dict):
                raise TypeError(f"Received an invalid value for `source`: source[{i}] is a "
                                f"{type(record).__name__}, expected a dict such as {{\"text\": ...}}.")
        if not source:
            raise ValueError("Received an invalid value for `source`: an empty list (no examples).")
        return list(source), [f"source[{i}]" for i in range(len(source))]
    raise TypeError("Received an invalid value for `source`, expected a JSONL file path or a list of dicts. "
                    f"Received: source={type(source).__name__}")


def _lines(path: str) -> Iterator[Tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield number, line


def _string(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise ValueError(f"Received an invalid value for `source`: {where} has no {key!r} key (keys: "
                         f"{sorted(record)}); every example must have the keys of the first one.")
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"Received an invalid value for `source`: {where} has {key}={value!r}, expected a string.")
    return value


class TextFormat:
    """``{"text": ...}``: every token trained (the start token, when added, is never a label)."""

    name = "text"
    keys = ("text",)
    adds_special_tokens = True

    def __init__(self, completion_only: bool = True):
        del completion_only  # plain text has no prompt

    def segments(self, record: dict, where: str) -> Segments:
        return [(_string(record, "text", where), True)]


class CompletionFormat:
    """``{"prompt": ..., "completion": ...}``: the prompt's tokens are context only (weight 0)
    unless ``completion_only=False``; the completion and the end token are trained. The two
    texts are joined as they are (no separator is added)."""

    name = "prompt/completion"
    keys = ("prompt", "completion")
    adds_special_tokens = True

    def __init__(self, completion_only: bool = True):
        self.completion_only = completion_only

    def segments(self, record: dict, where: str) -> Segments:
        prompt = _string(record, "prompt", where)
        return [(prompt, not self.completion_only), (_string(record, "completion", where), True)]


class ChatFormat:
    """``{"messages": [...]}`` rendered with a `ChatTemplate`: the tokens an assistant wrote
    (and the end-of-turn text the template writes after each) are trained; system, user and
    tool turns and the template's own text are context, unless ``completion_only=False``.
    The template writes any start/end tokens itself (``bos_token`` / ``eos_token``)."""

    name = "chat"
    keys = ("messages",)
    adds_special_tokens = False

    def __init__(self, completion_only: bool = True, template: Optional[ChatTemplate] = None,
                 roles: Sequence[str] = ("assistant",)):
        if template is None:
            raise ValueError("Received `chat_template=None` for chat data ({\"messages\": ...}): pass the model's "
                             "chat template (e.g. tf_lora.data.read_chat_template(checkpoint_folder)).")
        self.completion_only, self.template, self.roles = completion_only, template, tuple(roles)

    def segments(self, record: dict, where: str) -> Segments:
        if "messages" not in record:
            raise ValueError(f"Received an invalid value for `source`: {where} has no 'messages' key (keys: "
                             f"{sorted(record)}); every example must have the keys of the first one.")
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"Received an invalid value for `source`: {where} has messages={messages!r}, "
                             "expected a non-empty list of {\"role\": ..., \"content\": ...}.")
        for k, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ValueError(f"Received an invalid value for `source`: {where}, messages[{k}]={message!r}, "
                                 "expected a dict with a string 'role' (and its 'content').")
        try:
            text, spans = self.template.assistant_spans(messages, self.roles)
        except ValueError as e:
            raise ValueError(f"Received an invalid value for `source` at {where}: {e}") from None
        if not self.completion_only:
            return [(text, True)]
        segments, at = [], 0
        for start, end in spans:
            segments += [(text[at:start], False), (text[start:end], True)]
            at = end
        segments.append((text[at:], False))
        return [s for s in segments if s[0]]


FORMATS = (ChatFormat, CompletionFormat, TextFormat)  # first match wins


def format_for(record: dict, where: str):
    """The format class whose keys the first example has."""
    for cls in FORMATS:
        if all(k in record for k in cls.keys):
            return cls
    raise ValueError(f"Received an invalid value for `source`: {where} has keys {sorted(record)}, expected one of the "
                     "formats {\"text\": ...}, {\"prompt\": ..., \"completion\": ...} or {\"messages\": [...]}.")
