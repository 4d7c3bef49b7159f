"""adapt + compile + fit under tf.distribute.MultiWorkerMirroredStrategy with two
worker processes on 127.0.0.1 equals training on one replica on the same global
batches, for LoRA, QLoRA and an adapted Functional subclass; BackupAndRestore
resumes an interrupted run in restarted workers.

Each worker (tests/multiworker_worker.py) trains both ways in its own process
and reports. Tolerance: 1e-5 absolute on predictions after 3 epochs x 2 batches
of SGD with momentum (the runs differ only in the order of float32 sums). Every launch is
bounded by a timeout (and the workers' collectives by one of their own), after
which the workers' process groups are killed, so a hung collective fails the
test instead of hanging CI.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tf_lora import _compat

pytestmark = pytest.mark.skipif(not _compat.averages_replica_gradients(), reason="multi-replica fit needs Keras >= 3.8 (tf_lora refuses it on older Keras)")

TESTS = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(TESTS, "multiworker_worker.py")
TIMEOUT_S = 240
TOL = 1e-5


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _launch(phase, tmp_path, n=2):
    """Runs `n` workers of `phase`; returns their reports, chief first."""
    addresses = [f"127.0.0.1:{p}" for p in _free_ports(n)]
    procs, outs = [], []
    for i in range(n):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3",
               "PYTHONPATH": os.pathsep.join([os.path.dirname(TESTS), os.environ.get("PYTHONPATH", "")]),
               "TF_CONFIG": json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": i}})}
        outs.append(tmp_path / f"{phase}-{i}.json")
        log = open(tmp_path / f"{phase}-{i}.log", "w")
        procs.append(subprocess.Popen([sys.executable, WORKER, str(outs[-1]), str(tmp_path), phase],
                                      env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    logs = [(tmp_path / f"{phase}-{i}.log").read_text()[-3000:] for i in range(n)]
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"worker {i} of {phase!r} exited {p.returncode} (timeout {TIMEOUT_S}s):\n{logs[i]}"
    return [json.loads(o.read_text()) for o in outs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiworker")
    start = time.monotonic()
    train = _launch("train", tmp)
    resume = _launch("resume", tmp)
    print(f"\nmulti-worker test: {time.monotonic() - start:.1f}s, worker reports:",
          json.dumps({"train": train, "resume": resume}))
    return train, resume


@pytest.mark.parametrize("case", ["lora", "qlora", "subclass"])
def test_two_workers_match_one_replica(runs, case):
    train, _ = runs
    for worker in train:
        r = worker["cases"][case]
        assert "MirroredVariable" in r["kinds"], r
        assert r["moved"] > 1e-3, r  # training did something
        assert r["diff"] <= TOL, r
        assert r["predict_diff"] <= TOL, r  # model.predict gathers across workers
        assert max(abs(a - b) for a, b in zip(r["loss_single"], r["loss_dist"])) <= TOL, r
        assert abs(r["eval_single"] - r["eval_dist"]) <= TOL, r
    if case == "subclass":
        assert train[0]["cases"][case]["class"] == "Backbone"


def test_only_the_chief_writes_the_adapter(runs):
    chief, other = runs[0]
    assert chief["chief"] and not other["chief"]
    assert chief["adapter_written"] and chief["adapter_bytes"] == other["adapter_bytes"] > 0
    assert not any(name.startswith("tf_lora-worker-") for name in os.listdir(os.environ.get("TMPDIR", "/tmp")))


def test_plain_keras_model_is_untouched(runs):
    for worker in runs[0]:
        assert "PerReplica" in worker["plain_keras"], worker["plain_keras"]  # keras-team/keras#20585, as before


def test_malformed_tf_config_is_named_by_fit(runs):
    for worker in runs[0]:
        assert "TF_CONFIG" in worker["bad_tf_config"] and "index" in worker["bad_tf_config"], worker["bad_tf_config"]


def test_backup_and_restore_resumes_after_restart(runs):
    train, resume = runs
    for worker in train:
        assert worker["interrupted"] == "simulated worker failure"
        assert "latest.weights.h5" in worker["backup_files"], worker
    for worker in resume:
        assert worker["epochs_run"] == [2, 3], worker  # epochs 0-1 came from the backup
        assert worker["diff"] <= TOL, worker  # equals an uninterrupted single-replica run
    assert not resume[0]["backup_left"]  # the chief removes the backup at the end
