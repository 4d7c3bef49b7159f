"""tf_lora.AdapterCheckpoint: trainable state only, atomic, keep-last/best, and resume in a new process."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import keras_hub
import numpy as np
import pytest

import tf_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 64


def _tokenize(text):
    return [2 + (ord(c) % (VOCAB - 2)) for c in text]


def _records(n=40):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    return [{"prompt": " ".join(rng.choice(words, rng.integers(1, 4))) + ": ",
             "completion": " ".join(rng.choice(words, rng.integers(1, 5)))} for _ in range(n)]


def _model(dropout=0.1, seed=0):
    keras.backend.clear_session()  # layer names as a new process gives them (adapter files key by path)
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.Llama3Backbone(vocabulary_size=VOCAB, num_layers=2, num_query_heads=2,
                                               num_key_value_heads=1, hidden_dim=16, intermediate_dim=32)
    lm = keras_hub.models.Llama3CausalLM(backbone, preprocessor=None)
    model = tf_lora.adapt(lm, tf_lora.LoRAConfig(rank=2, alpha=4, dropout=dropout, target_modules=("query", "value")))
    model.compile(optimizer=keras.optimizers.AdamW(1e-2, weight_decay=0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    return model


def _train(batch_size=4, seed=3, n=40):
    data = tf_lora.data.prepare(_records(n), _tokenize, sequence_length=24, bos_id=1, eos_id=1, verbose=0)
    return data.dataset(batch_size=batch_size, seed=seed)


# The worker runs in a fresh process: "plain" trains 3 epochs with no callback; "crash" trains
# with checkpoints every 4 batches and dies (os._exit, no cleanup) after global batch 14,
# inside epoch 1; "resume" runs the same script again and finishes from the checkpoint.
WORKER = textwrap.dedent("""
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    sys.path.insert(0, {tests!r})
    import keras, numpy as np, tensorflow as tf
    tf.config.experimental.enable_op_determinism()
    import test_adapter_checkpoint as t, tf_lora
    mode, directory, out = sys.argv[1:4]
    model, train = t._model(), t._train()
    callbacks = []
    if mode != "plain":
        callbacks.append(tf_lora.AdapterCheckpoint(directory, save_freq=4, keep_last=2, data=train, verbose=0))
    if mode == "crash":
        class Crash(keras.callbacks.Callback):
            seen = 0
            def on_train_batch_end(self, batch, logs=None):
                Crash.seen += 1
                if Crash.seen == 14:
                    os._exit(3)
        callbacks.append(Crash())
    model.fit(train, epochs=3, verbose=0, callbacks=callbacks)
    np.savez(out, iterations=model.optimizer.iterations.numpy(),
             **{{f"v{{i}}": v.numpy() for i, v in enumerate(model.lora_variables)}})
""")


def _run(tmp_path, mode, directory, out, env=None):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=os.path.join(ROOT, "tests")))
    return subprocess.run([sys.executable, str(script), mode, str(directory), str(out)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT, **(env or {})}, capture_output=True, text=True,
                          timeout=300)


def test_resume_in_new_process_equals_uninterrupted_run(tmp_path):
    runs = tmp_path / "ckpt"
    plain = _run(tmp_path, "plain", runs, tmp_path / "plain.npz")
    assert plain.returncode == 0, plain.stderr[-3000:]
    crash = _run(tmp_path, "crash", runs, tmp_path / "crash.npz")
    assert crash.returncode == 3, crash.stderr[-3000:]
    names = sorted(os.listdir(runs))
    assert names == ["ckpt-000000008", "ckpt-000000012"], names  # keep_last=2; none half-written
    state = json.loads((runs / "ckpt-000000012" / "state.json").read_text())
    assert (state["epoch"], state["step"], state["global_step"]) == (1, 2, 12)  # 10 batches per epoch
    resumed = _run(tmp_path, "resume", runs, tmp_path / "resumed.npz")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = np.load(tmp_path / "plain.npz"), np.load(tmp_path / "resumed.npz")
    assert int(a["iterations"]) == int(b["iterations"]) == 30
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a.files if k != "iterations")
    moved = max(float(np.max(np.abs(a[k]))) for k in a.files if k != "iterations")
    print(f"resumed vs uninterrupted: max |difference| {worst:.3g} (adapter entries up to {moved:.3g})")
    assert worst <= 1e-6, worst
    assert moved > 1e-3  # the adapters did train


def _fitted(tmp_path, **kwargs):
    model, train = _model(), _train(n=16)  # 4 batches per epoch
    ckpt = tf_lora.AdapterCheckpoint(str(tmp_path / "run"), data=train, verbose=0, **kwargs)
    model.fit(train, epochs=2, verbose=0, callbacks=[ckpt])
    return model, train, ckpt


def _state(model):
    return ([v.numpy().copy() for v in model.lora_variables], [np.array(v.numpy()) for v in model.optimizer.variables],
            [v.numpy().copy() for v in model.variables if v.path.endswith("seed_generator_state")])


@pytest.mark.parametrize("fmt", ["tf_lora", "peft", "both"])
def test_checkpoint_holds_the_trainable_state_and_restores_it_exactly(tmp_path, fmt):
    model, _, ckpt = _fitted(tmp_path, save_freq="epoch", format=fmt)
    assert [os.path.basename(p) for p in ckpt.checkpoints] == ["ckpt-000000004", "ckpt-000000008"]
    files = sorted(os.listdir(ckpt.latest))
    expected = {"tf_lora": ["adapter.safetensors"], "peft": ["peft"], "both": ["adapter.safetensors", "peft"]}[fmt]
    assert files == sorted(expected + ["state.json", "trainer_state.safetensors"])
    if fmt != "peft":  # the adapter file holds the adapters only, never a frozen weight
        from safetensors.numpy import load_file

        keys = load_file(os.path.join(ckpt.latest, "adapter.safetensors"))
        assert keys and all(k.endswith(("/lora_a", "/lora_b")) for k in keys)
        assert len(keys) == len(model.lora_variables)
    saved = _state(model)
    fresh = _model(seed=1)  # other initial adapters, an unbuilt optimizer
    resumed = tf_lora.AdapterCheckpoint(str(tmp_path / "run")).restore(fresh)
    assert (resumed.epoch, resumed.step, resumed.global_step) == (2, 0, 8)
    for a, b in zip(saved, _state(fresh)):
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_keep_last_and_best(tmp_path):
    losses = []
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: losses.append(logs["loss"]))
    model, train = _model(), _train(n=16)
    ckpt = tf_lora.AdapterCheckpoint(str(tmp_path / "run"), save_freq=1, keep_last=2, monitor="loss", data=train,
                                     verbose=0)
    model.fit(train, epochs=2, verbose=0, callbacks=[ckpt, record])
    best = 1 + int(np.argmin(losses))  # the global step whose logged loss was lowest
    expected = sorted({7, 8, best})
    assert [os.path.basename(p) for p in ckpt.checkpoints] == [f"ckpt-{s:09d}" for s in expected]
    assert ckpt.best == os.path.join(str(tmp_path / "run"), f"ckpt-{best:09d}")
    # A known sequence of monitored values: the best survives pruning, then gives way to a better one.
    ckpt2 = tf_lora.AdapterCheckpoint(str(tmp_path / "best"), keep_last=2, monitor="val_loss", verbose=0)
    ckpt2.set_model(model)
    for step, value in enumerate([5.0, 1.0, 4.0, 3.0, 6.0, 0.5], start=1):
        ckpt2._global_step = step
        ckpt2.save({"val_loss": value})
        if step == 5:
            assert [os.path.basename(p) for p in ckpt2.checkpoints] == ["ckpt-000000002", "ckpt-000000004",
                                                                        "ckpt-000000005"]
    assert [os.path.basename(p) for p in ckpt2.checkpoints] == ["ckpt-000000005", "ckpt-000000006"]
    assert os.path.basename(ckpt2.best) == "ckpt-000000006"


def test_a_failed_save_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    model, _, ckpt = _fitted(tmp_path, save_freq="epoch")
    before = ckpt.checkpoints
    import tf_lora.adapter_checkpoint as module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(module, "_write_trainer_state", broken, raising=False)
    monkeypatch.setattr(module.AdapterCheckpoint, "_write_trainer_state", lambda self, path: broken())
    ckpt._global_step = 99
    with pytest.raises(OSError, match="disk full"):
        ckpt.save({})
    assert ckpt.checkpoints == before
    assert not [n for n in os.listdir(tmp_path / "run") if not n.startswith("ckpt-")]  # no temporary folder left


def test_restore_into_another_model_fails_and_changes_nothing(tmp_path):
    _fitted(tmp_path, save_freq="epoch")
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.Llama3Backbone(vocabulary_size=VOCAB, num_layers=2, num_query_heads=2,
                                               num_key_value_heads=1, hidden_dim=16, intermediate_dim=32)
    other = tf_lora.adapt(keras_hub.models.Llama3CausalLM(backbone, preprocessor=None),
                          tf_lora.LoRAConfig(rank=4, alpha=4, target_modules=("query", "value")))
    other.compile(optimizer=keras.optimizers.AdamW(1e-2), loss="sparse_categorical_crossentropy")
    before = [v.numpy().copy() for v in other.lora_variables]
    with pytest.raises(ValueError, match="optimizer|rank"):
        tf_lora.AdapterCheckpoint(str(tmp_path / "run")).restore(other)
    assert all(np.array_equal(v.numpy(), b) for v, b in zip(other.lora_variables, before))


def test_mid_epoch_checkpoint_needs_the_data_to_resume(tmp_path):
    _fitted(tmp_path, save_freq=3)  # saves after batches 3 and 6: inside epochs 0 and 1
    model, train = _model(), _train(n=16)
    with pytest.raises(ValueError, match="data="):
        model.fit(train, epochs=2, verbose=0, callbacks=[tf_lora.AdapterCheckpoint(str(tmp_path / "run"), verbose=0)])


def test_finished_run_resumes_as_finished(tmp_path):
    model, train, ckpt = _fitted(tmp_path, save_freq="epoch")
    before = model.optimizer.iterations.numpy()
    model.fit(train, epochs=2, verbose=0, callbacks=[ckpt])  # resumes at epoch 2 of 2: nothing left
    assert model.optimizer.iterations.numpy() == before
    model.fit(train, epochs=1, verbose=0)  # a later fit without the callback starts at its own epoch 0
    assert model.optimizer.iterations.numpy() == before + 4


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(save_freq=0), ValueError, "save_freq"),
    (dict(save_freq="step"), ValueError, "save_freq"),
    (dict(keep_last=0), ValueError, "keep_last"),
    (dict(format="h5"), ValueError, "format"),
    (dict(mode="best"), ValueError, "mode"),
    (dict(monitor=3), TypeError, "monitor"),
], ids=["save_freq_zero", "save_freq_text", "keep_last_zero", "format_unknown", "mode_unknown", "monitor_not_str"])
def test_bad_arguments(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        tf_lora.AdapterCheckpoint(str(tmp_path), **kwargs)


def test_mid_epoch_checkpoint_refuses_other_data(tmp_path):
    _fitted(tmp_path, save_freq=3)  # 4 batches per epoch
    model, train = _model(), _train(batch_size=2, n=16)  # 8 batches per epoch
    with pytest.raises(ValueError, match="batches per epoch"):
        model.fit(train, epochs=2, verbose=0,
                  callbacks=[tf_lora.AdapterCheckpoint(str(tmp_path / "run"), data=train, verbose=0)])
