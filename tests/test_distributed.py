"""adapt + fit under tf.distribute.MirroredStrategy on 2 logical CPU devices
matches single-device training.

Logical devices must be configured before TensorFlow initialises, so the check
runs in a fresh subprocess. Tolerance: 1e-5 absolute on the adapter weights
after 3 SGD steps (the two runs differ only in the order of float32 sums).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tf_lora import _compat

pytestmark = pytest.mark.skipif(not _compat.averages_replica_gradients(), reason="multi-replica fit needs Keras >= 3.8 (tf_lora refuses it on older Keras)")

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    sys.path.insert(0, sys.argv[1])
    import tf_lora
    from models import mha_classifier

    keras.utils.set_random_seed(0)
    base = mha_classifier()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 6, 8)).astype("float32")
    y = rng.integers(0, 3, 16)
    config = tf_lora.LoRAConfig(rank=2, dropout=0.0, modules_to_save=("classifier",))

    def train(model):
        init = {v.path + str(i): v.numpy() for i, v in enumerate(model.lora_variables)}
        model.compile(optimizer=keras.optimizers.SGD(0.1),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
        return init, [v.numpy() for v in model.lora_variables]

    single = tf_lora.adapt(base, config)
    lora_init = [v.numpy() for v in single.lora_variables]
    _, single_after = train(single)

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        mirrored = tf_lora.adapt(base, config)
        for v, value in zip(mirrored.lora_variables, lora_init):
            v.assign(value)  # same random lora_a as the single-device run
        kinds = sorted({type(v.value).__name__ for v in mirrored.lora_variables})
        _, mirrored_after = train(mirrored)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(single_after, mirrored_after))
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(single_after, lora_init))
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "diff": diff, "moved": moved, "kinds": kinds}))
    """
)


def test_mirrored_strategy_matches_single_device():
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, tests_dir], capture_output=True, text=True, timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert "MirroredVariable" in result["kinds"], result
    assert result["moved"] > 1e-3  # training did something
    assert result["diff"] <= 1e-5, result
