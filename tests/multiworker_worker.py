"""One worker of tests/test_multiworker.py (run as a script, TF_CONFIG set by the test).

    python multiworker_worker.py OUT_JSON BACKUP_DIR PHASE

PHASE "train": trains three adapted models (LoRA Functional, QLoRA Functional,
LoRA on a Functional subclass, i.e. ``adapted_class``) under
MultiWorkerMirroredStrategy and, in the same process, the same models on one
replica (no strategy) on the same global batches; records the max prediction
differences, the loss histories and the evaluate losses. Then checks that a
plain Keras model still fails as in Keras (tf_lora patches nothing globally),
that save_adapter writes only on the chief, that a malformed TF_CONFIG is named
by fit, and starts a BackupAndRestore run that is interrupted at epoch 2.
PHASE "resume": new processes (the restart) resume that run from the backup.
"""

import json
import os
import sys
import time

T0 = time.time()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tf_lora  # noqa: E402

# A hung peer fails the collective after this long instead of blocking forever.
STRATEGY = tf_lora.multi_worker_strategy(tf.distribute.experimental.CommunicationOptions(timeout_seconds=60))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from models import Backbone, mha_classifier  # noqa: E402

OUT, BACKUP, PHASE = sys.argv[1], sys.argv[2], sys.argv[3]
TASK = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
GLOBAL_BATCH, EPOCHS = 16, 3
rng = np.random.default_rng(0)
X = rng.standard_normal((32, 6, 8)).astype("float32")
Y = rng.integers(0, 3, 32)
XB = {"token_ids": X, "padding_mask": np.ones((32, 6), "float32")}
YB = {"sequence_output": rng.standard_normal((32, 6, 8)).astype("float32"),
      "pooled_output": rng.standard_normal((32, 8)).astype("float32")}
CASES = {
    "lora": (mha_classifier, tf_lora.LoRAConfig(rank=2, dropout=0.0, modules_to_save=("classifier",)), X, Y),
    "qlora": (mha_classifier, tf_lora.LoRAConfig(rank=2, dropout=0.0, quantization=tf_lora.QLoRAConfig(group_size=16)), X, Y),
    "subclass": (lambda: Backbone(hidden=8, layers=1), tf_lora.LoRAConfig(rank=2, dropout=0.0), XB, YB),
}


def compile_model(model, case):
    loss = ({"sequence_output": "mse", "pooled_output": "mse"} if case == "subclass"
            else keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    # Momentum: optimizer state that BackupAndRestore must restore. (Not Adam: it turns
    # ~1e-9 float32 differences in a near-zero gradient into +-lr steps.)
    lr = 0.002 if case == "subclass" else 0.01  # the subclass's mse on 8 outputs takes bigger steps
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9), loss=loss)


def predictions(model, x):
    return [np.asarray(t) for t in tf.nest.flatten(model(x, training=False))]


def max_diff(a, b):
    return max(float(np.max(np.abs(p - q))) for p, q in zip(a, b))


def build(case, init=None):
    make_base, config, _, _ = CASES[case]
    keras.utils.set_random_seed(0)
    model = tf_lora.adapt(make_base(), config)
    if init is not None:
        for v, value in zip(model.lora_variables, init):
            v.assign(value)
    compile_model(model, case)
    return model


def train_phase():
    result = {"task": TASK, "cases": {}}
    for case, (_, _, x, y) in CASES.items():
        single = build(case)  # one replica, no strategy: the reference
        init = [v.numpy() for v in single.lora_variables]
        before = predictions(single, x)
        h1 = single.fit(x, y, batch_size=GLOBAL_BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
        with STRATEGY.scope():
            dist = build(case, init)
        kinds = sorted({type(v.value).__name__ for v in dist.lora_variables})
        h2 = dist.fit(x, y, batch_size=GLOBAL_BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
        e1 = single.evaluate(x, y, batch_size=GLOBAL_BATCH, verbose=0)
        e2 = dist.evaluate(x, y, batch_size=GLOBAL_BATCH, verbose=0)
        p2 = dist.predict(x, batch_size=GLOBAL_BATCH, verbose=0)
        after = predictions(single, x)
        result["cases"][case] = {
            "kinds": kinds, "class": type(dist).__name__,
            "diff": max_diff(after, predictions(dist, x)),
            "predict_diff": max_diff(after, [np.asarray(t) for t in tf.nest.flatten(p2)]),
            "moved": max_diff(after, before),
            "loss_single": h1.history["loss"], "loss_dist": h2.history["loss"],
            "eval_single": float(np.ravel(e1)[0]), "eval_dist": float(np.ravel(e2)[0]),
        }
        if case == "lora":
            path = os.path.join(BACKUP, "lora.adapter")
            result["adapter_bytes"] = tf_lora.save_adapter(dist, path)
            result["adapter_written"] = os.path.exists(path)
            result["chief"] = tf_lora.is_chief(dist)

    # A plain Keras model in the same process still meets keras-team/keras#20585.
    with STRATEGY.scope():
        plain = mha_classifier()
        plain.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    try:
        plain.fit(X, Y, batch_size=GLOBAL_BATCH, epochs=1, verbose=0)
        result["plain_keras"] = "trained"
    except Exception as e:  # noqa: BLE001 - recorded for the test to judge
        result["plain_keras"] = f"{type(e).__name__}: {str(e)[-200:]}"

    # fit names a malformed TF_CONFIG (the strategy was made from the good one).
    good = os.environ["TF_CONFIG"]
    os.environ["TF_CONFIG"] = '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}'
    try:
        with STRATEGY.scope():
            build("lora").fit(X, Y, batch_size=GLOBAL_BATCH, epochs=1, verbose=0)
        result["bad_tf_config"] = "no error"
    except ValueError as e:
        result["bad_tf_config"] = str(e)
    os.environ["TF_CONFIG"] = good

    # Fault tolerance: a run interrupted at the start of epoch 2, on every worker.
    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise RuntimeError("simulated worker failure")

    with STRATEGY.scope():
        model = build("lora", RESUME_INIT())
    try:
        model.fit(X, Y, batch_size=GLOBAL_BATCH, epochs=4, shuffle=False, verbose=0,
                  callbacks=[tf_lora.BackupAndRestore(os.path.join(BACKUP, "run")), Interrupt()])
    except RuntimeError as e:
        result["interrupted"] = str(e)
    result["backup_files"] = sorted(os.listdir(os.path.join(BACKUP, "run")))
    return result


def RESUME_INIT():
    init = np.random.default_rng(1)
    return [0.1 * init.standard_normal(v.shape).astype("float32") for v in build("lora").lora_variables]


def resume_phase():
    init = RESUME_INIT()
    single = build("lora", init)
    single.fit(X, Y, batch_size=GLOBAL_BATCH, epochs=4, shuffle=False, verbose=0)  # uninterrupted reference
    with STRATEGY.scope():
        model = build("lora", init)
    seen = []
    epochs = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs=None: seen.append(epoch))
    model.fit(X, Y, batch_size=GLOBAL_BATCH, epochs=4, shuffle=False, verbose=0,
              callbacks=[tf_lora.BackupAndRestore(os.path.join(BACKUP, "run")), epochs])
    return {"task": TASK, "epochs_run": seen, "diff": max_diff(predictions(single, X), predictions(model, X)),
            "backup_left": os.path.exists(os.path.join(BACKUP, "run"))}


result = train_phase() if PHASE == "train" else resume_phase()
result["seconds"] = time.time() - T0
with open(OUT, "w") as f:
    json.dump(result, f)
