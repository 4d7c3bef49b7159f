"""Data-parallel training on `tf.distribute`: workers, the chief, fault tolerance.

The TensorFlow-only seam of tf_lora's distributed training (the trainer fixes
for Keras's own code live in `_compat.MultiWorkerTrainer`):

- `read_tf_config` / `multi_worker_strategy`: a worker's ``TF_CONFIG``, checked,
  so a malformed one fails at once with a message naming the variable;
- `is_chief`: whether this worker is the one that writes files (adapters,
  checkpoints). Following Keras's multi-worker guidance, every worker runs the
  same saving code and the others write to a private temporary location that
  is deleted at once, so no two workers ever write the same file;
- `BackupAndRestore`: Keras's callback made safe with several workers: every
  worker restores from `backup_dir`, only the chief writes and deletes there;
- `check_fit_strategy`: `fit` refuses a model whose variables were not created
  under the strategy it trains with, and several replicas on a Keras older than
  3.8 (which sums the replicas' gradients instead of averaging them).

Example:
    >>> strategy = tf_lora.multi_worker_strategy()          # doctest: +SKIP
    >>> with strategy.scope():                                 # doctest: +SKIP
    ...     model = tf_lora.adapt(make_base(), config)
    ...     model.compile(optimizer="adam", loss="mse")
    >>> model.fit(ds, callbacks=[tf_lora.BackupAndRestore("/shared/backup")])  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from typing import Iterator, List, Optional

import keras

from tf_lora import _compat

_EXAMPLE = ('{"cluster": {"worker": ["host0:12345", "host1:12345"]}, '
            '"task": {"type": "worker", "index": 0}}')


def _bad(what: str, raw: str) -> ValueError:
    shown = raw if len(raw) <= 300 else raw[:300] + "..."
    return ValueError(
        f"Received an invalid value for the environment variable `TF_CONFIG`: {what}. Expected JSON like "
        f"{_EXAMPLE} (one entry per worker, the same cluster on every worker, each worker its own "
        f"task index). Received: TF_CONFIG={shown!r}"
    )


def read_tf_config(environ=None) -> Optional[dict]:
    """This worker's ``TF_CONFIG``, parsed and checked (None when it is unset or empty).

    Raises:
        ValueError: ``TF_CONFIG`` is not JSON, has no ``cluster`` of ``"host:port"``
            lists or no ``task`` of a type in the cluster with an index in range, or
            lists an address twice. The message names ``TF_CONFIG`` and quotes it.
    """
    raw = (os.environ if environ is None else environ).get("TF_CONFIG")
    if raw is None or not raw.strip():
        return None
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise _bad(f"it is not JSON ({e})", raw) from None
    if not isinstance(config, dict):
        raise _bad("it is not a JSON object", raw)
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise _bad('"cluster" must be an object mapping task types to lists of "host:port" addresses', raw)
    seen = set()
    for kind, addresses in cluster.items():
        if not isinstance(addresses, list) or not addresses:
            raise _bad(f'cluster[{kind!r}] must be a non-empty list of "host:port" addresses', raw)
        for address in addresses:
            host, _, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise _bad(f'cluster[{kind!r}] holds {address!r}, which is not a "host:port" address', raw)
            if address in seen:
                raise _bad(f"address {address!r} is listed twice", raw)
            seen.add(address)
    if not isinstance(task, dict):
        raise _bad('"task" must be an object such as {"type": "worker", "index": 0}', raw)
    kind, index = task.get("type"), task.get("index")
    if kind not in cluster and kind != "evaluator":  # an evaluator runs outside the cluster
        raise _bad(f"task type {kind!r} is not in the cluster (types: {sorted(cluster)})", raw)
    if kind in cluster and (isinstance(index, bool) or not isinstance(index, int)
                            or not 0 <= index < len(cluster[kind])):
        raise _bad(f"task index {index!r} is not in range for the {len(cluster[kind])} {kind!r} "
                   f"address(es)", raw)
    return config


def multi_worker_strategy(communication_options=None):
    """A `tf.distribute.MultiWorkerMirroredStrategy` for this worker, after checking
    ``TF_CONFIG`` (`read_tf_config`). Create it at the very start of the program,
    before any other TensorFlow call, as TensorFlow requires.

    Raises:
        ValueError: ``TF_CONFIG`` is malformed (the message names it).
    """
    read_tf_config()
    import tensorflow as tf

    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=communication_options)


def _strategy_of(model=None):
    import tensorflow as tf

    if model is not None and getattr(model, "distribute_strategy", None) is not None:
        return model.distribute_strategy
    return tf.distribute.get_strategy()


def is_chief(model_or_strategy=None) -> bool:
    """Whether this worker writes files (adapters, checkpoints) under the strategy of
    `model_or_strategy` (a model, a strategy, or None for the current one): the chief
    of a multi-worker cluster, and always True with a single worker."""
    if keras.backend.backend() != "tensorflow":  # tf.distribute is TensorFlow's; elsewhere one writer
        return True
    import tensorflow as tf

    if isinstance(model_or_strategy, tf.distribute.Strategy):
        strategy = model_or_strategy
    else:
        strategy = _strategy_of(model_or_strategy)
    return bool(strategy.extended.should_checkpoint)


@contextlib.contextmanager
def write_location(model, path: str) -> Iterator[str]:
    """Where this worker writes the file meant for `path`: `path` itself on the chief;
    elsewhere a file in a private temporary folder that is deleted afterwards."""
    if is_chief(model):
        yield path
        return
    folder = tempfile.mkdtemp(prefix="tf_lora-worker-")
    try:
        yield os.path.join(folder, os.path.basename(path) or "file")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# The dtypes TensorFlow's collectives carry (CollectiveBcastSend / CollectiveReduceV2).
_COLLECTIVE_DTYPES = ("bool", "float16", "float32", "float64", "int32", "int64")


def _multi_worker_scope():
    """The MultiWorkerMirroredStrategy (with more than one worker) whose scope we are in, or None."""
    import tensorflow as tf

    strategy = tf.distribute.get_strategy() if tf.distribute.has_strategy() else None
    return strategy if _compat.reduces_across_workers(strategy) else None


@contextlib.contextmanager
def worker_local_storage() -> Iterator[List]:
    """Under a multi-worker MultiWorkerMirroredStrategy scope, creates variables of a
    dtype TensorFlow's collectives cannot carry (QLoRA's packed uint8 NF4 codes) on
    each worker, outside the strategy: the strategy broadcasts every new variable's
    initial value from the chief, and that broadcast has no uint8. They are frozen
    (never updated by gradients); `broadcast_from_chief` gives every worker the
    chief's values afterwards. Yields the list the created variables are put in.
    Elsewhere it does nothing."""
    created: List = []
    if _multi_worker_scope() is None:
        yield created
        return
    import tensorflow as tf

    def creator(next_creator, **kwargs):
        dtype = kwargs.get("dtype")
        if dtype is None or tf.as_dtype(dtype).name in _COLLECTIVE_DTYPES:
            return next_creator(**kwargs)
        box = {}

        def make():  # a new thread is outside every strategy and creator scope
            try:
                box["variable"] = tf.Variable(**kwargs)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                box["error"] = e

        thread = threading.Thread(target=make)
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        created.append(box["variable"])
        return box["variable"]

    with tf.variable_creator_scope(creator):
        yield created


def _is_worker_local(variable) -> bool:
    return bool(getattr(getattr(variable, "value", variable), "_tf_lora_worker_local", False))


def broadcast_from_chief(variables) -> None:
    """Gives every worker the chief's values of the worker-local `variables` (made
    by `worker_local_storage`; no-op for none), as the strategy does for its own."""
    strategy = _multi_worker_scope()
    if not variables or strategy is None:
        return
    import tensorflow as tf

    def from_chief(value):  # the sum over replicas of replica 0's value (the chief's first device) and zeros
        ctx = tf.distribute.get_replica_context()
        first = tf.cast(tf.equal(ctx.replica_id_in_sync_group, 0), tf.int32)
        return ctx.all_reduce("SUM", value * first)

    for variable in variables:
        words = tf.cast(variable, tf.int32)  # one layer at a time: a transient int32 copy
        summed = strategy.experimental_local_results(strategy.run(from_chief, args=(words,)))[0]
        variable.assign(tf.cast(summed, variable.dtype))
        variable._tf_lora_worker_local = True  # fit's strategy check knows it


def check_fit_strategy(model) -> None:
    """Raises if `model` is fitted under a strategy that did not create its variables,
    or under MultiWorkerMirroredStrategy with a malformed ``TF_CONFIG``."""
    import tensorflow as tf

    strategy = model.distribute_strategy
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        read_tf_config()
    if strategy.num_replicas_in_sync > 1 and not _compat.averages_replica_gradients():
        raise NotImplementedError(
            f"Received a {type(strategy).__name__} with {strategy.num_replicas_in_sync} replicas, which needs "
            f"Keras >= 3.8: Keras {keras.version()} sums the replicas' gradients instead of averaging "
            "them (it does not scale the loss for distribution). Upgrade Keras (pip install 'keras>=3.8')."
        )
    needs_distributed = isinstance(strategy, (tf.distribute.MirroredStrategy,
                                              tf.distribute.MultiWorkerMirroredStrategy,
                                              tf.distribute.TPUStrategy))
    for variable in model.weights:
        if _is_worker_local(variable):
            continue
        value = getattr(variable, "value", variable)
        owner = getattr(value, "distribute_strategy", None) if isinstance(value, tf.distribute.DistributedValues) else None
        if (needs_distributed and owner is None) or (owner is not None and owner is not strategy):
            made = "outside any strategy" if owner is None else f"under another {type(owner).__name__}"
            raise ValueError(
                f"Model {model.name!r} is trained under {type(strategy).__name__}, but its variable "
                f"{variable.path!r} was created {made}. Create the base model and call tf_lora.adapt and "
                "model.compile inside `strategy.scope()`, then call fit."
            )


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` for one or many workers.

    Keras's callback writes `backup_dir` from every worker at once. Here every
    worker restores from `backup_dir` when training (re)starts, and only the chief
    writes and deletes there; the others write their backups to a private temporary
    folder that is deleted at the end of training. With several machines,
    `backup_dir` must be on a filesystem every worker reads (as for Keras's
    multi-worker fault tolerance). Arguments are Keras's.

    Example:
        >>> model.fit(ds, epochs=10, callbacks=[tf_lora.BackupAndRestore("/shared/run1")])  # doctest: +SKIP
    """

    _worker_dir: Optional[str] = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)  # restores from backup_dir on every worker
        if not is_chief(self.model):
            self._shared_dir = self.backup_dir
            self._worker_dir = tempfile.mkdtemp(prefix="tf_lora-backup-")
            _compat.redirect_backup(self, self._worker_dir)

    def on_train_end(self, logs=None):
        if self._worker_dir is None:
            return super().on_train_end(logs)
        shutil.rmtree(self._worker_dir, ignore_errors=True)
        _compat.redirect_backup(self, self._shared_dir)
        self._worker_dir = None
