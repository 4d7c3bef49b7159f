"""Chat templates: the Jinja templates Hugging Face tokenizers and GGUF files carry.

`ChatTemplate` renders a conversation the way ``transformers``' `apply_chat_template`
does (a sandboxed `jinja2` environment with ``trim_blocks`` and ``lstrip_blocks``, the
``loopcontrols`` extension, a ``tojson`` filter that keeps non-ASCII text, the
``raise_exception`` and ``strftime_now`` globals, and the variables ``messages``,
``add_generation_prompt``, ``bos_token`` and ``eos_token``), and finds the characters an
assistant wrote in the rendered text:

- where the template marks them with ``{% generation %} ... {% endgeneration %}`` (as
  ``transformers`` reads them for ``return_assistant_tokens_mask``), those blocks;
- otherwise by rendering incrementally: for assistant message ``i``, the span runs from
  the end of ``render(messages[:i], add_generation_prompt=True)`` to the end of
  ``render(messages[:i + 1])``: the message's content and what the template writes after
  it up to the next message (its end-of-turn marker, so the model learns to stop).
  Each partial rendering must be a prefix of the next; a template for which it is not
  raises a `ValueError` (add ``{% generation %}`` blocks to it).
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from typing import Dict, List, Optional, Sequence, Tuple

_START, _END = "\ue000", "\ue001"  # private-use characters marking generation blocks


def _environment():
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # pragma: no cover - jinja2 is a dependency of the `data` extra
        raise ImportError("Chat templates need jinja2: pip install 'tf_lora[data]' (or jinja2>=3.1).") from None

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: the body, between two markers."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            return _START + caller() + _END

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """A chat template, compiled once.

    Args:
        source: The Jinja template text (``tokenizer_config.json``'s ``chat_template``,
            a ``chat_template.jinja`` file, GGUF's ``tokenizer.chat_template``).
        bos_token: The string the template's ``bos_token`` variable holds.
        eos_token: The string the template's ``eos_token`` variable holds.
        **variables: Further template variables (e.g. ``tools``, ``date_string``).

    Example:
        >>> t = ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
        >>> t.render([{"role": "user", "content": "hi"}])
        '<user>hi'
    """

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", **variables):
        if not isinstance(source, str) or not source.strip():
            raise ValueError(f"Received an invalid value for `chat_template`, expected a Jinja template string. "
                             f"Received: chat_template={source!r}")
        environment = _environment()  # a clear ImportError without jinja2
        import jinja2

        try:
            self._template = environment.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ValueError(f"Received an invalid value for `chat_template`: not a valid Jinja template "
                             f"({e.message}, template line {e.lineno}).") from None
        self.source = source
        self.has_generation_blocks = _has_generation_blocks(source)
        self.variables = {"bos_token": bos_token or "", "eos_token": eos_token or "", **variables}

    def _render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        import jinja2

        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **self.variables)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"The chat template refused this conversation: {e}") from None

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text, as ``transformers``' ``apply_chat_template(tokenize=False)``
        renders it (generation markers removed)."""
        return self._render(messages, add_generation_prompt).replace(_START, "").replace(_END, "")

    def assistant_spans(self, messages: Sequence[dict],
                        roles: Sequence[str] = ("assistant",)) -> Tuple[str, List[Tuple[int, int]]]:
        """The rendered conversation and the ``(start, end)`` character spans of what the
        messages whose role is in `roles` wrote (see the module docstring).

        Raises:
            ValueError: the template raised, or it is not prefix-stable and has no
                ``{% generation %}`` blocks.
        """
        for message in messages:
            for value in message.values():
                if isinstance(value, str) and (_START in value or _END in value):
                    raise ValueError("A message contains the private-use characters U+E000/U+E001, "
                                     "which tf_lora uses to mark generation blocks.")
        if self.has_generation_blocks:
            return _strip_markers(self._render(messages, False))
        full = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") not in roles:
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            after = self.render(messages[: i + 1])
            if not (after.startswith(before) and full.startswith(after)):
                raise ValueError(
                    "The chat template renders a conversation differently from its beginning (rendering "
                    f"messages[:{i}] with add_generation_prompt=True and then messages[:{i + 1}] does not give "
                    "prefixes of the whole), so the assistant's tokens cannot be found by incremental rendering. "
                    "Mark them in the template with {% generation %}...{% endgeneration %}."
                )
            if len(after) > len(before):
                spans.append((len(before), len(after)))
        return full, spans


def _has_generation_blocks(source: str) -> bool:
    return re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None


def _strip_markers(text: str) -> Tuple[str, List[Tuple[int, int]]]:
    out: List[str] = []
    spans, start, length = [], None, 0
    for ch in text:
        if ch == _START:
            start = length
        elif ch == _END:
            if start is not None and length > start:
                spans.append((start, length))
            start = None
        else:
            out.append(ch)
            length += 1
    return "".join(out), spans


def read_chat_template(path: str) -> str:
    """The chat template of a Hugging Face checkpoint or tokenizer folder.

    Reads ``chat_template.jinja``, else ``chat_template.json``'s or
    ``tokenizer_config.json``'s ``chat_template`` (the ``"default"`` one where it is a
    list of named templates).

    Raises:
        FileNotFoundError: `path` is not a folder.
        ValueError: the folder holds no chat template.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise FileNotFoundError(f"Received an invalid value for `path`, expected a checkpoint folder. Received: path={path!r}")
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    for name in ("chat_template.json", "tokenizer_config.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file, encoding="utf-8") as f:
                template = json.load(f).get("chat_template")
            if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
                named: Dict[str, str] = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default")
            if isinstance(template, str) and template.strip():
                return template
    raise ValueError(f"Received an invalid value for `path`: {os.fspath(path)!r} holds no chat template "
                     "(chat_template.jinja, or a chat_template in chat_template.json / tokenizer_config.json).")


def template_of(tokenizer) -> Optional[str]:
    """The chat template a tokenizer (or preprocessor, or CausalLM) carries, if any."""
    for obj in (tokenizer, getattr(tokenizer, "tokenizer", None)):
        template = getattr(obj, "chat_template", None)
        if isinstance(template, str) and template.strip():
            return template
    return None
