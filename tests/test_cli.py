"""The `tf-lora` command line (tf_lora/cli): train, generate and merge end to end in subprocesses on a
tiny Qwen2 saved as a Hugging Face checkpoint folder (what KerasHub's exporter writes, plus the
tokenizer.json, `architectures`, sliding-window keys and chat template a real Qwen2 folder has),
checked against transformers + PEFT; the model formats; and bad input (exit status 2, one line
naming the argument, before anything loads).

Tolerances (float32, logits up to ~15): Keras vs transformers 1e-4 absolute (the same weights through two
frameworks: PEFT adapter 3e-5, merged checkpoint 4e-5 measured); the merged checkpoint vs the unmerged
adapted model 1e-5 x the largest logit (7e-5 measured: folding s*A@B into W rounds differently); the same
model loaded from three formats 1e-6 (0 measured).
"""

import configparser
import json
import os
import subprocess
import sys

import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

import keras  # noqa: E402

import tf_lora  # noqa: E402
from tf_lora import cli  # noqa: E402
from tf_lora.cli import common  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["The quick brown fox jumps over the lazy dog.", "What is 2+2? It is 4.", "Hello, how are you today?",
          "user\nassistant\nsystem\n"] * 10
QUESTION, ANSWER = "What is 2+2?", "It is 4."
PROBE = np.array([[1, 296, 201, 268, 272, 264, 298, 13, 20, 33, 2, 201]], "int32")


def _chat(question, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Qwen2 (embeddings N(0, 1), so logits are not all ~0) with a byte-level BPE trained here,
    saved as a Hugging Face folder, a KerasHub preset and a .keras file; a tiny GPT-2 preset; JSONL files."""
    root = tmp_path_factory.mktemp("cli")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(CORPUS, tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    keras.utils.set_random_seed(0)
    tokenizer = keras_hub.models.QwenTokenizer(vocabulary=model["vocab"], merges=merges, unsplittable_tokens=SPECIALS[1:])
    backbone = keras_hub.models.QwenBackbone(vocabulary_size=tokenizer.vocabulary_size(), num_layers=2,
                                             num_query_heads=2, num_key_value_heads=1, hidden_dim=16, intermediate_dim=32)
    table = backbone.token_embedding.embeddings
    table.assign(np.random.default_rng(0).normal(0, 1, table.shape).astype("float32"))
    lm = keras_hub.models.QwenCausalLM(backbone, keras_hub.models.QwenCausalLMPreprocessor(tokenizer, sequence_length=32))
    paths = {"hf": str(root / "qwen-hf"), "preset": str(root / "qwen-preset"), "keras": str(root / "qwen.keras")}
    lm.save_to_preset(paths["preset"])
    lm.save(paths["keras"])
    lm.export_to_transformers(paths["hf"])
    bpe.save(os.path.join(paths["hf"], "tokenizer.json"))
    for name, update in (("config.json", dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=False,
                                              sliding_window=4096)),
                         ("tokenizer_config.json", dict(chat_template=CHATML))):
        with open(os.path.join(paths["hf"], name)) as f:
            config = json.load(f)
        with open(os.path.join(paths["hf"], name), "w") as f:
            json.dump({**config, **update}, f)

    gpt2 = keras_hub.models.GPT2Backbone(vocabulary_size=tokenizer.vocabulary_size(), num_layers=1, num_heads=2,
                                         hidden_dim=16, intermediate_dim=32, max_sequence_length=32)
    gpt2_tokenizer = keras_hub.models.GPT2Tokenizer(vocabulary=model["vocab"], merges=merges)
    paths["gpt2"] = str(root / "gpt2-preset")
    keras_hub.models.GPT2CausalLM(gpt2, keras_hub.models.GPT2CausalLMPreprocessor(gpt2_tokenizer)).save_to_preset(
        paths["gpt2"])

    paths["chat"] = _write_jsonl(root / "chat.jsonl", [_chat(QUESTION, ANSWER)] * 12)
    paths["valid"] = _write_jsonl(root / "valid.jsonl", [_chat(QUESTION, ANSWER)] * 4)
    paths["text"] = _write_jsonl(root / "text.jsonl", [{"text": t} for t in CORPUS[:8]])
    paths["root"], paths["bpe"] = str(root), (model["vocab"], merges)
    return paths


def _run(*argv):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-m", "tf_lora", *argv], capture_output=True, text=True, env=env,
                            timeout=600)
    return result


def _ok(result):
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    return result.stdout


def _logits(model, ids=PROBE):
    return keras.ops.convert_to_numpy(model({"token_ids": ids, "padding_mask": np.ones_like(ids)}))


def _greedy(lm, ids, stop, max_length):
    """Greedy decoding with plain forward passes (no cache): the reference for `generate`."""
    ids, out = list(ids), []
    while len(ids) < max_length:
        token = int(_logits(lm, np.array([ids], "int32"))[0, -1].argmax())
        if token in stop:
            break
        ids.append(token)
        out.append(token)
    return lm.preprocessor.tokenizer.detokenize(out)


def test_train_generate_merge_end_to_end(files):
    import torch
    import transformers
    from peft import PeftModel

    out = os.path.join(files["root"], "run")
    stdout = _ok(_run("train", "--model", files["hf"], "--data", files["chat"], "--valid", files["valid"], "--rank", "8",
                      "--dropout", "0", "--sequence-length", "32", "--batch-size", "4", "--epochs", "20",
                      "--learning-rate", "1e-2", "--save-every", "30", "--out", out))
    assert "data: 12 chat examples -> 12 rows of 32 tokens" in stdout and "valid: 4 chat examples" in stdout
    assert "trainable params: 4,096" in stdout
    assert sorted(os.listdir(out)) == ["adapter.safetensors", "checkpoints", "history.json", "loss.png", "peft",
                                       "train_config.json"]
    with open(os.path.join(out, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "train_config.json")) as f:
        config = json.load(f)
    assert (config["lora_config"]["rank"], config["lora_config"]["target_modules"], config["data_format"],
            config["model_format"], config["chat_template"]) == (8, "all-linear", "chat", "transformers", CHATML)
    assert config["data_stats"]["data"]["trained_tokens"] == 12 * 6  # "It is 4.<|im_end|>\n" per example
    with open(os.path.join(out, "history.json")) as f:
        history = json.load(f)
    assert len(history["steps"]) == 60 and len(history["epochs"]) == 20
    assert history["epochs"][-1]["loss"] < 0.1 * history["epochs"][0]["loss"]
    assert history["epochs"][-1]["val_loss"] < 0.1 * history["epochs"][0]["val_loss"]
    assert len(os.listdir(os.path.join(out, "checkpoints"))) == 2  # steps 30 and 60

    # The trained adapter, applied in Keras, against transformers + PEFT on the same folder. (Read from
    # peft/: the tf_lora file is keyed by layer paths, and this process has built a Qwen backbone
    # before, so a converted one is named qwen_backbone_1; generate and merge below read that file.)
    lm = common.apply_adapter(common.load_model(files["hf"]), ("peft", os.path.join(out, "peft")))
    expected = _logits(lm)
    base = transformers.AutoModelForCausalLM.from_pretrained(files["hf"], torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, os.path.join(out, "peft")).eval()
    with torch.no_grad():
        got = peft_model(torch.tensor(PROBE, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)  # measured 3e-5

    # generate --chat: greedy decoding of the adapted model, which learned the answer.
    answer = _ok(_run("generate", "--model", files["hf"], "--adapter", out, "--prompt", QUESTION, "--chat",
                      "--max-length", "28")).rstrip("\n").split("\n")[-1]
    tokenizer = lm.preprocessor.tokenizer
    prompt = tf_lora.data.ChatTemplate(CHATML).render([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    ids = tf_lora.data.TokenizerAdapter(lm).encode_segments([[(prompt, False)]])[0][0]
    assert answer == _greedy(lm, ids, {tokenizer.end_token_id, tokenizer.token_to_id("<|im_end|>")}, 28) == ANSWER

    # merge: a Hugging Face folder transformers loads, computing what the adapted Keras model computes.
    merged = os.path.join(files["root"], "merged")
    assert "Qwen2ForCausalLM" in _ok(_run("merge", "--model", files["hf"], "--adapter", out, "--out", merged))
    with open(os.path.join(merged, "tokenizer_config.json")) as f:
        assert json.load(f)["chat_template"] == CHATML
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(merged, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf_merged(torch.tensor(PROBE, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, _logits(tf_lora.merge(lm)), atol=1e-4)  # measured 4e-5 (logits up to 15)
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max())  # merged vs adapted: 7e-5
    assert np.abs(expected - _logits(common.load_model(files["hf"]))).max() > 1.0  # the adapter did change it


def test_every_model_format_loads_the_same_model(files):
    kinds = {k: common.model_format(files[k]) for k in ("hf", "preset", "keras", "gpt2")}
    assert kinds == {"hf": "transformers", "preset": "preset", "keras": "keras", "gpt2": "preset"}
    models = {k: common.load_model(files[k]) for k in ("hf", "preset", "keras")}
    assert {type(m).__name__ for m in models.values()} == {"QwenCausalLM"}
    assert all(type(m.preprocessor.tokenizer).__name__ == "QwenTokenizer" for m in models.values())
    for k in ("preset", "keras"):
        np.testing.assert_allclose(_logits(models[k]), _logits(models["hf"]), atol=1e-6)


def test_gguf_file_trains_and_generates(files, tmp_path, capsys):
    from test_gguf import CHAT, write_gguf  # skips without the gguf package

    path = write_gguf(tmp_path / "m.gguf", hidden=32, ffn=64, layers=2)
    assert common.model_format(path) == "gguf"
    out = str(tmp_path / "run")
    # Each command as in a fresh process: tf_lora's adapter file is keyed by layer paths, which start with
    # the backbone's name, and Keras names a second Llama3Backbone in one process llama3_backbone_1.
    keras.backend.clear_session()
    assert cli.main(["train", "--model", path, "--data", files["text"], "--sequence-length", "16", "--out", out]) == 0
    assert {"adapter.safetensors", "peft"} <= set(os.listdir(out))  # a Llama3CausalLM: PEFT has its name map
    capsys.readouterr()
    keras.backend.clear_session()
    assert cli.main(["generate", "--model", path, "--adapter", out, "--prompt", "the cat", "--chat",
                     "--max-length", "16"]) == 0
    answer = capsys.readouterr().out.rstrip("\n").split("\n")[-1]
    lm = common.apply_adapter(tf_lora.load_gguf(path), ("peft", os.path.join(out, "peft")))
    adapter = tf_lora.data.TokenizerAdapter(lm)
    prompt = tf_lora.data.ChatTemplate(CHAT, bos_token=adapter.bos_token, eos_token=adapter.eos_token).render(
        [{"role": "user", "content": "the cat"}], add_generation_prompt=True)
    ids = adapter.encode_segments([[(prompt, False)]])[0][0]
    expected = _greedy(lm, ids, {adapter.eos_id}, 16)
    assert answer == expected and len(expected) > 0


def test_train_writes_tf_lora_format_only_where_peft_has_no_name_map(files, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # and without matplotlib: no PNG, a note
    from tf_lora.interop import peft as tf_peft  # GPT-2 has a name map now: take it away to reach the other branch

    monkeypatch.setattr(tf_peft, "MAPS", tuple(m for m in tf_peft.MAPS if m.name != "gpt2"))
    out = os.path.join(files["root"], "gpt2-run")
    assert cli.main(["train", "--model", files["gpt2"], "--data", files["text"], "--sequence-length", "16",
                     "--target-modules", "query", "value", "--out", out]) == 0
    stdout = capsys.readouterr().out
    assert "note: PEFT format not written (tf_lora has no Hugging Face name map for GPT2Backbone" in stdout
    assert "note: matplotlib is not installed" in stdout
    assert sorted(os.listdir(out)) == ["adapter.safetensors", "history.json", "train_config.json"]
    assert tf_lora.read_adapter_config(os.path.join(out, "adapter.safetensors")).target_modules == ("query", "value")


def test_packing_trains_only_a_model_that_keeps_packed_examples_apart(files, capsys):
    lm = tf_lora.adapt(common.load_model(files["hf"]), tf_lora.LoRAConfig(rank=2, target_modules="all-linear"))
    error = cli.train.check_packing(lm)
    status = cli.main(["train", "--model", files["hf"], "--data", files["chat"], "--sequence-length", "32", "--packing",
                       "--out", os.path.join(files["root"], "packed")])
    if error > 1e-4:  # the model reads no segment_ids / positions: its packed rows would mix examples
        assert status == 2
        assert "error: argument --packing: QwenCausalLM does not keep packed examples apart" in capsys.readouterr().err
    else:
        assert status == 0


def test_merge_of_an_architecture_kerashub_cannot_export_exits_2(files, capsys, tmp_path):
    vocab, merges = files["bpe"]  # Falcon's tokenizer is a byte-level BPE ending with <|endoftext|>, as GPT-2's
    falcon = keras_hub.models.FalconCausalLM(
        keras_hub.models.FalconBackbone(vocabulary_size=len(vocab), num_layers=1, num_attention_heads=2, hidden_dim=16,
                                        intermediate_dim=32),
        keras_hub.models.FalconCausalLMPreprocessor(keras_hub.models.FalconTokenizer(vocabulary=vocab, merges=merges)))
    falcon.save_to_preset(str(tmp_path / "falcon"))
    adapted = tf_lora.adapt(falcon, tf_lora.LoRAConfig(rank=2, target_modules="all-linear"))
    tf_lora.save_adapter(adapted, str(tmp_path / "falcon.adapter"))
    status = cli.main(["merge", "--model", str(tmp_path / "falcon"), "--adapter", str(tmp_path / "falcon.adapter"),
                       "--out", str(tmp_path / "merged")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert err.startswith("tf-lora merge: error: argument --model: KerasHub cannot export FalconBackbone")
    assert not os.path.exists(tmp_path / "merged") and [p for p in os.listdir(tmp_path) if p.startswith(".tmp")] == []


def _bad_inputs(files, tmp):
    os.makedirs(os.path.join(tmp, "empty-folder"), exist_ok=True)
    os.makedirs(os.path.join(tmp, "hf-no-weights"), exist_ok=True)
    with open(os.path.join(tmp, "hf-no-weights", "config.json"), "w") as f:
        json.dump({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, f)
    for name, content in (("notes.txt", "hello"), ("fake.gguf", "GGML"), ("fake.keras", "not a zip"),
                          ("empty.jsonl", "\n\n"), ("bad.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": "c",\n'),
                          ("list.jsonl", '{"text": "a"}\n[1, 2]\n'), ("keys.jsonl", '{"question": "a"}\n')):
        with open(os.path.join(tmp, name), "w") as f:
            f.write(content)
    full = os.path.join(tmp, "full-folder")
    os.makedirs(full, exist_ok=True)
    open(os.path.join(full, "x"), "w").close()
    t = lambda **kw: ["train", *sum(([f"--{k.replace('_', '-')}", v] for k, v in {
        "model": files["hf"], "data": files["chat"], "out": os.path.join(tmp, "out"), **kw}.items()), [])]
    p = lambda name: os.path.join(tmp, name)
    return {
        "missing_model": (t(model=p("nope")), "--model", "no such file or folder"),
        "unknown_file_format": (t(model=p("notes.txt")), "--model", "unknown model format 'notes.txt'"),
        "folder_without_config": (t(model=p("empty-folder")), "--model", "has no config.json"),
        "hf_folder_without_safetensors": (t(model=p("hf-no-weights")), "--model", "has no *.safetensors"),
        "not_gguf": (t(model=p("fake.gguf")), "--model", "not a GGUF file"),
        "not_keras_archive": (t(model=p("fake.keras")), "--model", "not a .keras archive"),
        "missing_data": (t(data=p("nope.jsonl")), "--data", "no such file"),
        "malformed_jsonl_line": (t(data=p("bad.jsonl")), "--data", "line 3 of"),
        "jsonl_line_not_an_object": (t(data=p("list.jsonl")), "--data", "line 2 of"),
        "empty_jsonl": (t(data=p("empty.jsonl")), "--data", "holds no examples (empty file)"),
        "unknown_jsonl_keys": (t(data=p("keys.jsonl")), "--data", "expected one of the formats"),
        "bad_valid": (t(valid=p("bad.jsonl")), "--valid", "line 3 of"),
        "out_is_a_file": (t(out=p("notes.txt")), "--out", "is a file"),
        "target_modules": (t(target_modules="query["), "--target-modules", "expected a valid regular expression"),
        "missing_adapter": (["generate", "--model", files["hf"], "--adapter", p("nope"), "--prompt", "x"], "--adapter",
                            "no such file or folder"),
        "folder_without_adapter": (["merge", "--model", files["hf"], "--adapter", p("empty-folder"), "--out", p("m")],
                                   "--adapter", "holds no adapter"),
        "merge_out_not_empty": (["merge", "--model", files["hf"], "--adapter", files["chat"], "--out", full], "--out",
                                "is not empty"),
        "missing_chat_template": (["generate", "--model", files["hf"], "--prompt", "x", "--chat-template", p("no.jinja")],
                                  "--chat-template", "no such file or folder"),
    }


BAD = ["missing_model", "unknown_file_format", "folder_without_config", "hf_folder_without_safetensors", "not_gguf",
       "not_keras_archive", "missing_data", "malformed_jsonl_line", "jsonl_line_not_an_object", "empty_jsonl",
       "unknown_jsonl_keys", "bad_valid", "out_is_a_file", "target_modules", "missing_adapter", "folder_without_adapter",
       "merge_out_not_empty", "missing_chat_template"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_with_one_line_naming_the_argument_before_loading(files, case, tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(common, "load_model", no_loading)
    for module in (cli.train, cli.generate, cli.merge):
        monkeypatch.setattr(module, "load_model", no_loading)
    argv, argument, message = _bad_inputs(files, str(tmp_path))[case]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"tf-lora {argv[0]}: error: argument {argument}: "), err
    assert message in err, err


@pytest.mark.parametrize("argv, argument, message", [
    (["--data", "keys2"], "--data", "line 2 of"),  # a later line lacks the first line's key
    (["--sequence-length", "4"], "--data", "no example has a trained token left at sequence_length=4"),
    (["--data", "text", "--valid", "chat"], "--chat-template", None),  # GPT-2 carries no chat template
], ids=["missing_key", "sequence_length_shorter_than_the_prompt", "chat_data_without_template"])
def test_data_errors_found_while_tokenizing_exit_2(files, argv, argument, message, tmp_path, capsys):
    keys2 = _write_jsonl(tmp_path / "keys2.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a"}])
    values = {"keys2": keys2, "text": files["text"], "chat": files["chat"]}
    argv = [values.get(a, a) for a in argv]
    model = files["gpt2"] if argument == "--chat-template" else files["hf"]
    base = {"--model": model, "--data": files["chat"], "--out": str(tmp_path / "out")}
    base.update(dict(zip(argv[::2], argv[1::2])))
    assert cli.main(["train", *sum(map(list, base.items()), [])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"tf-lora train: error: argument {argument}: "), err
    assert message is None or message in err, err
    assert not os.path.exists(tmp_path / "out")


def test_help_for_every_command(capsys):
    for command in ([], ["train"], ["generate"], ["merge"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main([*command, "--help"])
        assert exit_.value.code == 0
        assert ("--model" in capsys.readouterr().out) == bool(command)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--model", "m", "--data", "d", "--out", "o", "--rank", "0"])
    assert exit_.value.code == 2 and "argument --rank: expected a positive int, received '0'" in capsys.readouterr().err


def test_python_dash_m_and_the_console_script(tmp_path):
    result = _run("train", "--model", str(tmp_path / "nope"), "--data", "d.jsonl", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.startswith("tf-lora")]
    assert lines == [f"tf-lora train: error: argument --model: no such file or folder: '{tmp_path / 'nope'}'"]
    assert result.stderr.rstrip().splitlines()[-1] == lines[0]  # TensorFlow's start-up log lines come first
    setup = configparser.ConfigParser()
    setup.read(os.path.join(REPO, "setup.cfg"))
    assert setup["options.entry_points"]["console_scripts"].strip() == "tf-lora = tf_lora.cli:main"
    assert "matplotlib" in setup["options.extras_require"]["cli"]
