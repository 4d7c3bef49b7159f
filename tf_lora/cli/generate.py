"""``tf-lora generate``: a continuation of a prompt from a model, with or without an adapter.

The prompt is tokenized as ``train`` tokenizes its examples (`tf_lora.data.TokenizerAdapter`:
the start token before a plain prompt; with ``--chat`` the chat template writes its own), and
`generate` of the KerasHub CausalLM runs on those ids, so a model answers the way it was
trained. Generation stops at the tokenizer's end token and, with ``--chat``, at the token the
template writes after an assistant's turn (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``...).
"""

from __future__ import annotations

import contextlib
import os
from typing import List, Optional

from tf_lora.cli.common import (MODEL_HELP, UsageError, adapter_location, apply_adapter, blame, chat_template,
                                load_model, model_format, positive)


def add_parser(commands) -> None:
    g = commands.add_parser("generate", help="generate text with a model and an adapter",
                            description="Generate a continuation of --prompt (greedy by default) and print it.")
    g.add_argument("--model", required=True, metavar="PATH", help=MODEL_HELP)
    g.add_argument("--adapter", metavar="DIR", help="a train output folder, a PEFT adapter folder or a tf_lora "
                   "adapter file (default: the base model alone)")
    g.add_argument("--prompt", required=True, help="the prompt (with --chat: the user's message)")
    g.add_argument("--chat", action="store_true", help="render the prompt as a user turn with the chat template")
    g.add_argument("--system", help="with --chat: a system message before the prompt")
    g.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template file (implies --chat)")
    g.add_argument("--max-length", type=positive(int),
                   help="total tokens, prompt included (default: the preprocessor's sequence length)")
    g.add_argument("--sampler", default="greedy", help="KerasHub sampler name: greedy (default), top_k, top_p, ...")
    g.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    g.add_argument("--dtype", help="load the model in this dtype (e.g. bfloat16); not for .keras files")
    g.set_defaults(run=run)


def _end_of_turn(template, adapter) -> List[int]:
    """The special token the chat template writes right after an assistant's message, if any."""
    probe = "\ue002"
    with contextlib.suppress(ValueError):
        text = template.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": probe}])
        if probe in text:
            ids, _ = adapter.encode_segments([[(text[text.index(probe) + 1:], False)]])[0]
            if len(ids) and int(ids[0]) in set(adapter.special_tokens.values()):
                return [int(ids[0])]
    return []


def generate_text(lm, prompt: str, max_length: Optional[int] = None, chat_template: Optional[str] = None,
                  system: Optional[str] = None) -> str:
    """What `lm` writes after `prompt` (the prompt left out), the prompt tokenized as
    `tf_lora.data.prepare` tokenizes training examples; with `chat_template`, `prompt` is a
    user message rendered with it (and an optional `system` message)."""
    import numpy as np

    from tf_lora.data import ChatTemplate, TokenizerAdapter

    adapter = TokenizerAdapter(lm)
    stop = [adapter.eos_id] if adapter.eos_id is not None else []
    stop += [getattr(adapter.tokenizer, "end_token2_id", None)] if hasattr(adapter.tokenizer, "end_token2_id") else []
    if chat_template is not None:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        with blame("--chat-template"):
            template = ChatTemplate(chat_template, bos_token=adapter.bos_token, eos_token=adapter.eos_token)
            text = template.render(messages, add_generation_prompt=True)
        ids = adapter.encode_segments([[(text, False)]])[0][0]
        stop += _end_of_turn(template, adapter)
    else:
        ids = adapter.encode_segments([[(prompt, False)]])[0][0]
        if adapter.bos_id is not None:
            ids = np.concatenate([[adapter.bos_id], ids])
    preprocessor = lm.preprocessor
    max_length = max_length or getattr(preprocessor, "sequence_length", None) or len(ids) + 128
    if len(ids) >= max_length:
        raise UsageError("--max-length", f"the prompt is {len(ids)} tokens; expected a --max-length above that. "
                                         f"Received: {max_length}")
    stop = tuple(sorted({int(s) for s in stop if s is not None}))
    # KerasHub's sampler counts a stop id anywhere after the prompt as "done", the padding too:
    # pad with an id that stops nothing (the ids there are overwritten as tokens are generated).
    pad = adapter.pad_id if adapter.pad_id not in stop else next(i for i in range(len(stop) + 1) if i not in stop)
    x = {"token_ids": np.full((1, max_length), pad, "int32"), "padding_mask": np.zeros((1, max_length), "int32")}
    x["token_ids"][0, :len(ids)], x["padding_mask"][0, :len(ids)] = ids, 1
    lm.preprocessor = None  # the prompt is tokenized already
    try:
        out = lm.generate(x, stop_token_ids=stop or None, strip_prompt=True)
    finally:
        lm.preprocessor = preprocessor
    ids = np.asarray(out["token_ids"])[0]
    mask = np.asarray(out["padding_mask"])[0].astype(bool)
    at = np.flatnonzero(mask & np.isin(ids, stop))
    if at.size:  # the stop token and anything after it are not part of the answer
        mask[at[0]:] = False
    text = preprocessor.generate_postprocess({"token_ids": ids[None], "padding_mask": mask[None]})
    text = text[0] if not isinstance(text, str) else text
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


def run(args) -> int:
    model_format(args.model)
    location = adapter_location(args.adapter) if args.adapter else None
    if args.chat_template is not None and not os.path.exists(args.chat_template):
        raise UsageError("--chat-template", f"no such file or folder: {args.chat_template!r}")
    import keras

    keras.utils.set_random_seed(args.seed)
    lm = load_model(args.model, args.dtype)
    template = None
    if args.chat or args.chat_template:
        template = chat_template(lm, args.model, args.chat_template)
        if template is None:
            raise UsageError("--chat", "the model carries no chat template; pass --chat-template FILE")
    if location is not None:
        lm = apply_adapter(lm, location)
    with blame("--sampler"):
        lm.compile(sampler=args.sampler)
    print(generate_text(lm, args.prompt, args.max_length, template, args.system))
    return 0
