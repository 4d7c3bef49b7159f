"""Adapter checkpoints: the trainable state only, every N steps or each epoch, and resume.

`AdapterCheckpoint` is a Keras callback. Each checkpoint is a folder
``<directory>/ckpt-<global step, 9 digits>/`` holding:

- ``adapter.safetensors``: `tf_lora.save_adapter`'s file (adapter and `modules_to_save`
  variables; written with ``to_original_base=False``, so it is exactly what trains),
  and/or ``peft/``: the same adapter as a Hugging Face PEFT directory;
- ``trainer_state.safetensors``: the optimizer's variables (slots, step counter, loss
  scale...) in the optimizer's order, and the model's random seed states (dropout);
- ``state.json``: the data position (epoch, step in the epoch, global step), the
  monitored value and the optimizer's variable names and shapes.

It is written into a temporary folder beside it and renamed when complete, so a crash
never leaves a half checkpoint under a checkpoint's name. The frozen base is never
written: for a 7B model a checkpoint is megabytes where Keras' `BackupAndRestore`
writes every weight.

Resume: with ``resume=True`` (default), `fit` restores the latest checkpoint in
`directory` when it starts and continues from its data position. A checkpoint taken
inside an epoch needs `data`, the training dataset, whose order for an epoch must be
the same in every process (a `tf_lora.data` dataset orders epoch ``e`` by ``(seed, e)``):
the callback trains that epoch's remaining batches itself (`train_on_batch`, before the
next epoch starts; that epoch's validation and other callbacks' epoch-end hooks do not
run again), then `fit` goes on with the next epoch. The result equals an uninterrupted
run (the test checks 1e-6).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import List, Optional

import keras
import numpy as np
from keras import ops

from tf_lora import _compat, distribute
from tf_lora.adapter_files import _umask
from tf_lora.adapters import load_adapter, save_adapter

FORMAT = "tf_lora.checkpoint"
FORMAT_VERSION = 1
_PREFIX, _TMP = "ckpt-", ".tmp-ckpt-"


@dataclasses.dataclass(frozen=True)
class ResumeState:
    """Where a restored checkpoint left training: `epoch` (0-based), `step` (batches of
    that epoch already trained), `global_step` (batches in all) and its `path`."""

    epoch: int
    step: int
    global_step: int
    path: str


def _seed_states(model) -> list:
    """The model's random seed states (dropout), in the model's order (paths repeat)."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


def _train_variables(model) -> list:
    train = {id(v) for v in getattr(model, "lora_variables", model.trainable_variables)}
    return [v for v in model.trainable_variables if id(v) in train]


class AdapterCheckpoint(keras.callbacks.Callback):
    """Saves the trainable state during `fit` and resumes from it.

    Args:
        directory: Folder of the checkpoints (created if missing).
        save_freq: ``"epoch"``: at the end of each epoch; an int N: every N batches.
        keep_last: Keep the last k checkpoints (and the best one); None keeps all.
        monitor: A log name (``"val_loss"``, ``"loss"``...) whose best value's checkpoint
            is kept beyond `keep_last` (see `best`); None: no best.
        mode: ``"min"``, ``"max"`` or ``"auto"`` (max for names with "acc", else min).
        format: ``"tf_lora"`` (default), ``"peft"`` or ``"both"``: how the adapter is
            written (PEFT: plain LoRA on KerasHub architectures with a name map).
        data: The training dataset, needed to resume inside an epoch (see the module
            docstring). A `tf_lora.data` dataset is also told each epoch's index.
        resume: Restore the latest checkpoint in `directory` when `fit` starts.
        verbose: 1 prints each save and the resume; 0 is silent.

    Example:
        >>> train = data.dataset(batch_size=8)                                          # doctest: +SKIP
        >>> ckpt = tf_lora.AdapterCheckpoint("run1", save_freq=100, keep_last=3, data=train)  # doctest: +SKIP
        >>> model.fit(train, epochs=3, callbacks=[ckpt])  # the same line resumes a run  # doctest: +SKIP
    """

    def __init__(self, directory: str, save_freq="epoch", keep_last: Optional[int] = 3, monitor: Optional[str] = None,
                 mode: str = "auto", format: str = "tf_lora", data=None, resume: bool = True, verbose: int = 1):
        super().__init__()
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"Received an invalid value for `directory`, expected a folder path. Received: {directory!r}")
        if save_freq != "epoch" and (isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1):
            raise ValueError(f"Received an invalid value for `save_freq`, expected 'epoch' or a positive integer. "
                             f"Received: save_freq={save_freq!r}")
        if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
            raise ValueError(f"Received an invalid value for `keep_last`, expected a positive integer or None. "
                             f"Received: keep_last={keep_last!r}")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"Received an invalid value for `mode`, expected 'auto', 'min' or 'max'. Received: mode={mode!r}")
        if format not in ("tf_lora", "peft", "both"):
            raise ValueError(f"Received an invalid value for `format`, expected 'tf_lora', 'peft' or 'both'. "
                             f"Received: format={format!r}")
        if monitor is not None and not isinstance(monitor, str):
            raise TypeError(f"Received an invalid value for `monitor`, expected a log name or None. Received: {monitor!r}")
        self.directory = os.fspath(directory)
        self.save_freq, self.keep_last, self.monitor, self.format = save_freq, keep_last, monitor, format
        self.mode = mode if mode != "auto" else ("max" if monitor and "acc" in monitor else "min")
        self.data, self.resume, self.verbose = data, bool(resume), verbose
        self._epoch, self._step, self._global_step = 0, 0, 0

    # -- the checkpoints on disk -----------------------------------------------------------
    @property
    def checkpoints(self) -> List[str]:
        """Complete checkpoint folders, oldest first."""
        if not os.path.isdir(self.directory):
            return []
        names = sorted(n for n in os.listdir(self.directory) if n.startswith(_PREFIX)
                       and os.path.isfile(os.path.join(self.directory, n, "state.json")))
        return [os.path.join(self.directory, n) for n in names]

    @property
    def latest(self) -> Optional[str]:
        """The newest checkpoint folder, or None."""
        found = self.checkpoints
        return found[-1] if found else None

    @property
    def best(self) -> Optional[str]:
        """The checkpoint with the best `monitor` value so far, or None."""
        scored = [(s["value"], p) for p, s in ((p, _read_state(p)) for p in self.checkpoints)
                  if s.get("monitor") == self.monitor and s.get("value") is not None]
        if not scored:
            return None
        return (min if self.mode == "min" else max)(scored, key=lambda vp: vp[0])[1]

    # -- saving ------------------------------------------------------------------------------
    def save(self, logs: Optional[dict] = None) -> Optional[str]:
        """Writes a checkpoint of the model's trainable state now; returns its folder (None
        on a worker other than the chief, which writes nothing)."""
        model = self.model
        if not distribute.is_chief(model):
            return None
        os.makedirs(self.directory, exist_ok=True)
        final = os.path.join(self.directory, f"{_PREFIX}{self._global_step:09d}")
        if os.path.isdir(final):
            return final
        value = (logs or {}).get(self.monitor) if self.monitor else None
        tmp = tempfile.mkdtemp(prefix=_TMP, dir=self.directory)
        try:
            if self.format in ("tf_lora", "both"):
                save_adapter(model, os.path.join(tmp, "adapter.safetensors"), to_original_base=False)
            if self.format in ("peft", "both"):
                save_adapter(model, os.path.join(tmp, "peft"), format="peft")
            names, seeds = self._write_trainer_state(os.path.join(tmp, "trainer_state.safetensors"))
            state = {"format": FORMAT, "format_version": FORMAT_VERSION, "epoch": self._epoch, "step": self._step,
                     "global_step": self._global_step, "steps_per_epoch": (self.params or {}).get("steps"),
                     "monitor": self.monitor,
                     "value": None if value is None else float(value), "optimizer": names, "seeds": seeds}
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump(state, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o777 & ~_umask())
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()
        if self.verbose:
            print(f"AdapterCheckpoint: saved {final} (epoch {self._epoch}, step {self._step})")
        return final

    def _write_trainer_state(self, path: str) -> list:
        from safetensors.numpy import save_file

        tensors, names = {}, []
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and optimizer.built:
            for i, v in enumerate(optimizer.variables):
                tensors[f"optimizer/{i:05d}"] = _array(v)
                names.append([v.name, list(v.shape)])
        seeds = _seed_states(self.model)
        for i, v in enumerate(seeds):
            tensors[f"seed/{i:05d}"] = _array(v)
        save_file(tensors, path)
        return names, [v.path for v in seeds]

    def _prune(self) -> None:
        found = self.checkpoints
        if self.keep_last is None or len(found) <= self.keep_last:
            return
        keep = set(found[-self.keep_last:]) | {self.best}
        for path in found:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)

    # -- restoring ---------------------------------------------------------------------------
    def restore(self, model: Optional[keras.Model] = None, path: Optional[str] = None) -> Optional[ResumeState]:
        """Loads checkpoint `path` (default: the latest) into `model` (default: the
        callback's): adapter, optimizer state and seed states. Everything is checked
        before anything is assigned. Returns the `ResumeState`, or None when
        `directory` holds no checkpoint. The optimizer is built if it is not yet.

        Raises:
            ValueError: a checkpoint that does not fit the model or its optimizer.
        """
        from safetensors.numpy import load_file

        model = model if model is not None else self.model
        path = path if path is not None else self.latest
        if path is None:
            return None
        state = _read_state(path)
        tensors = load_file(os.path.join(path, "trainer_state.safetensors"))
        optimizer = getattr(model, "optimizer", None)
        saved = state.get("optimizer") or []
        if saved:
            if optimizer is None:
                raise ValueError(f"Checkpoint {path!r} holds optimizer state; compile the model before restoring it.")
            if not optimizer.built:
                optimizer.build(_train_variables(model))
            current = [[v.name, list(v.shape)] for v in optimizer.variables]
            if current != saved:
                raise ValueError(f"Checkpoint {path!r} holds the state of another optimizer or other trainable "
                                 f"variables: saved {len(saved)} optimizer variables (e.g. {saved[:2]}), this "
                                 f"model's optimizer has {len(current)} (e.g. {current[:2]}).")
        seeds = _seed_states(model)
        if [v.path for v in seeds] != state.get("seeds"):
            raise ValueError(f"Checkpoint {path!r} holds the random seed states of other layers: saved "
                             f"{state.get('seeds')[:3]}..., this model has {[v.path for v in seeds][:3]}...")
        adapter = os.path.join(path, "adapter.safetensors")
        load_adapter(model, adapter if os.path.isfile(adapter) else os.path.join(path, "peft"))
        if saved:
            for i, v in enumerate(optimizer.variables):
                v.assign(np.reshape(tensors[f"optimizer/{i:05d}"], v.shape))
        for i, v in enumerate(seeds):
            v.assign(np.reshape(tensors[f"seed/{i:05d}"], v.shape))
        return ResumeState(state["epoch"], state["step"], state["global_step"], path)

    # -- the callback ------------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        if os.path.isdir(self.directory):
            for name in os.listdir(self.directory):  # leftovers of a crash inside `save`
                if name.startswith(_TMP):
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        self._epoch, self._step, self._global_step = 0, 0, 0
        latest = self.latest if self.resume else None
        if latest is None:
            return
        steps = self.params.get("steps") if self.params else None
        state = _read_state(latest)
        if state["step"] and steps and state.get("steps_per_epoch") and state["steps_per_epoch"] != steps:
            raise ValueError(f"Checkpoint {latest!r} was taken with {state['steps_per_epoch']} batches per epoch, this "
                             f"fit has {steps}: its data position does not apply to this data (other data, batch "
                             "size or drop_remainder?). Resume with the same dataset, or use another directory.")
        if state["step"] and self.data is None and state["step"] != steps:
            raise ValueError(f"Checkpoint {latest!r} was taken inside epoch {state['epoch']} (after {state['step']} "
                             "batches); pass the training dataset as AdapterCheckpoint(data=...) to resume there.")
        resumed = self.restore(self.model, latest)
        self._epoch, self._step, self._global_step = resumed.epoch, resumed.step, resumed.global_step
        if self.verbose:
            print(f"AdapterCheckpoint: resumed from {latest} (epoch {resumed.epoch}, step {resumed.step})")
        if resumed.step and resumed.step != steps:
            self._finish_epoch(resumed)
        elif resumed.step:
            self._epoch, self._step = resumed.epoch + 1, 0
        _compat.set_initial_epoch(self.model, self._epoch)

    def _finish_epoch(self, resumed: ResumeState) -> None:
        """Trains the remaining batches of the interrupted epoch, as `fit` would have."""
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(resumed.epoch)
        batches = self.data.skip(resumed.step) if hasattr(self.data, "skip") else _skip(self.data, resumed.step)
        logs = {}
        for batch in batches:
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
            logs = self.model.train_on_batch(x, y, sample_weight, return_dict=True)
            self._after_batch(self._step, logs)
        self.on_epoch_end(resumed.epoch, logs)

    def on_train_end(self, logs=None):
        _compat.set_initial_epoch(self.model, None)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._step = epoch, 0
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(epoch)

    def on_train_batch_end(self, batch, logs=None):
        self._after_batch(batch, logs)

    def _after_batch(self, batch, logs) -> None:
        done = int(batch) + 1  # Keras passes the last batch index of the execution
        before, self._global_step = self._global_step, self._global_step + done - self._step
        self._step = done
        if self.save_freq != "epoch" and self._global_step // self.save_freq > before // self.save_freq:
            steps = self.params.get("steps") if self.params else None
            if steps and self._step == steps:  # the epoch's last batch: the position is the next epoch
                self._epoch, self._step = self._epoch + 1, 0
            self.save(logs)

    def on_epoch_end(self, epoch, logs=None):
        self._epoch, self._step = epoch + 1, 0
        if self.save_freq == "epoch":
            self.save(logs)


def _array(variable) -> np.ndarray:
    return np.array(ops.convert_to_numpy(variable), order="C")  # keeps 0-d arrays 0-d


def _skip(data, n: int):
    iterator = iter(data)
    for _ in range(n):
        next(iterator)
    return iterator


def _read_state(path: str) -> dict:
    file = os.path.join(path, "state.json")
    try:
        with open(file) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"Received an invalid value for `path`: {path!r} is not a readable tf_lora checkpoint ({e}).") from None
    if state.get("format") != FORMAT:
        raise ValueError(f"Received an invalid value for `path`: {path!r} is not a tf_lora checkpoint.")
    return state
