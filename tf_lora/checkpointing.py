"""Gradient checkpointing: recompute each transformer block's forward in the backward pass.

`enable_gradient_checkpointing(model)` wraps the `call` of every block of `model` (KerasHub
decoder blocks and transformer encoders/decoders, nested Functional sub-models, or the
layers you name) in `tf.recompute_grad`: the backward pass recomputes the block's
activations instead of keeping them, so a train step holds one block's activations at a
time plus the block inputs (QLoRA's memory recipe, Dettmers et al. 2023).

- `recompute_last=False` leaves the last block out (as
  `torch.utils.checkpoint.checkpoint_sequential` does its last segment): the backward
  starts with it right after the forward, so recomputing it buys least. It trades peak
  memory for speed: in `benchmarks/bench_checkpointing.py` (4 blocks, T=512, KerasHub's
  attention) the step went from 1.39x to 1.24-1.27x the step without checkpointing, the
  peak from 0.30x to 0.33-0.37x (the last block's activations then coexist with the
  logits and their gradient).

- Chunked attention (`tf_lora.use_chunked_attention`) is not run twice: its backward needs
  only its inputs, output and log-sum-exp (it recomputes the scores per tile itself), so the
  block's recomputation replays the output and log-sum-exp of the forward pass
  (`chunked_kernel.Memo`, one (batch, T, heads, head_dim) output per block kept) and
  recomputes only the rest of the block: projections, norms, MLP. Inside a checkpointed
  block the op runs its loops also where it would pick its fused pass (whose backward keeps
  the whole score matrix), except with attention dropout (the loops draw their masks per
  tile, the fused pass per matrix: the masks stay those without checkpointing).

- `tf.recompute_grad` takes tensors only: every non-tensor argument (bools, None, a Python
  int) is closed over, and only the tensor arguments go through it.
- Dropout draws from Keras `SeedGenerator` states, which advance on each call; their states
  are captured before the forward and restored before the recomputation, so both passes
  draw the same masks and the gradients equal those without checkpointing.
- The recomputation runs (in the gradient, outside `Layer.__call__`) on new tensors, so what
  a call passes implicitly is restored for it: the Keras masks of every tensor argument
  (nested ones too; e.g. the padding mask of an `Embedding(mask_zero=True)` output, which
  KerasHub's `TransformerEncoder` reads from its input), and Keras' call context (nested
  layers take `training` from it) and autocast scope (mixed precision). Masks a block
  attaches to its outputs are attached to the returned tensors too.
- A call with a KV cache (`generate()`), or while no gradient tape is recording (predict,
  evaluate), runs the block unchanged.
"""

from __future__ import annotations

import copy
import re
from typing import List, Optional, Sequence, Union

import keras
import tensorflow as tf

from tf_lora import _compat, surgery
from tf_lora.layers import chunked_kernel

_BLOCK_CLASSES = re.compile(r".*(DecoderBlock|TransformerDecoder|TransformerEncoder|DecoderLayer|EncoderLayer|"
                            r"TransformerLayer)$")


class _RecomputedCall:
    """The instance `call` of a checkpointed block (an object, so that copying a model
    with `copy.deepcopy` rebinds it to the copied layer)."""

    def __init__(self, layer):
        self.layer = layer

    def _seed_states(self) -> List["keras.Variable"]:
        found, seen = [], set()
        for _, sub, _ in [("", self.layer, None), *surgery.walk(self.layer)]:
            for value in vars(sub).values():
                if isinstance(value, keras.random.SeedGenerator) and id(value) not in seen:
                    seen.add(id(value))
                    found.append(value.state)
        return found

    def __call__(self, *args, **kwargs):
        original = type(self.layer).call.__get__(self.layer)
        flat = tf.nest.flatten((args, kwargs))
        symbolic = any(isinstance(x, keras.KerasTensor) for x in flat)
        if symbolic or kwargs.get("cache") is not None or not _compat.gradient_tape_recording():
            return original(*args, **kwargs)
        positions = [i for i, x in enumerate(flat) if tf.is_tensor(x) or isinstance(x, keras.Variable)]
        tensors = [tf.convert_to_tensor(flat[i]) for i in positions]
        # The recomputation gets new tensors (identities of these): the Keras masks attached
        # to the arguments (an Embedding(mask_zero=True) output, read by blocks that mask
        # from their input) are attached to them again, like the rest of what a call
        # passes implicitly: Keras' call context (`training`) and autocast scope.
        masks = [_compat.get_keras_mask(flat[i]) for i in positions]
        states = self._seed_states()
        saved = [tf.identity(s.value) for s in states]
        call_state = _compat.current_call_state()
        call_state = (copy.copy(call_state[0]), *call_state[1:])  # the context object is reset after the call
        output_masks = []  # of the forward pass, attached to the outputs recompute_grad returns
        memo, passes = chunked_kernel.Memo(), []  # the chunked attention's forward results, replayed

        def block(*inputs):
            for state, value in zip(states, saved):
                state.assign(value)  # the same dropout masks in the forward and the recomputation
            values = list(flat)
            for i, t, mask in zip(positions, inputs, masks):
                if mask is not None and _compat.get_keras_mask(t) is None:
                    _compat.set_keras_mask(t, mask)
                values[i] = t
            a, k = tf.nest.pack_sequence_as((args, kwargs), values)
            with _compat.call_state(call_state), chunked_kernel.memo_scope(memo, replaying=bool(passes)):
                outputs = original(*a, **k)
            passes.append(True)
            if not output_masks:
                output_masks.append([_compat.get_keras_mask(o) for o in tf.nest.flatten(outputs)])
            return outputs

        outputs = tf.recompute_grad(block)(*tensors)
        for o, mask in zip(tf.nest.flatten(outputs), output_masks[0] if output_masks else ()):
            if mask is not None and _compat.get_keras_mask(o) is None:
                _compat.set_keras_mask(o, mask)
        return outputs


def _outermost(pairs) -> list:
    found = []
    for path, layer in pairs:
        if not any(path.startswith(p + "/") for p, _ in found):
            found.append((path, layer))
    return found


def _blocks(model, blocks) -> list:
    layers = [(path, layer) for path, layer, _ in surgery.walk(model)]
    if isinstance(blocks, str):
        return _outermost([(p, l) for p, l in layers if re.fullmatch(blocks, p)])
    if blocks is not None:
        return _outermost([(p, l) for p, l in layers if l.name in blocks or p in blocks])
    named = _outermost([(p, l) for p, l in layers if _BLOCK_CLASSES.fullmatch(type(l).__name__)])
    if named:
        return named
    # Otherwise the innermost nested Functional sub-models (e.g. one per block).
    graphs = [(p, l) for p, l in layers if isinstance(l, keras.Model) and surgery.is_graph_model(l)]
    return [(p, l) for p, l in graphs if not any(q.startswith(p + "/") for q, _ in graphs)]


def enable_gradient_checkpointing(model: keras.Model, blocks: Optional[Union[str, Sequence[str]]] = None,
                                  recompute_last: bool = True) -> List[str]:
    """Recomputes each block's forward in the backward pass instead of storing it.

    Args:
        model: a Keras model (usually one returned by `tf_lora.adapt`; also set by
            ``LoRAConfig(gradient_checkpointing=True)``).
        blocks: which layers are blocks: `None` (default) finds KerasHub transformer blocks
            (classes named ``*DecoderBlock``, ``*TransformerDecoder``, ``*TransformerEncoder``,
            ``*DecoderLayer``...) and nested Functional sub-models; or a regex on layer
            paths, or a sequence of layer names/paths.
        recompute_last: whether the last block (in the model's layer order) is recomputed
            too (the default). `False` stores its activations instead when more than one
            block is found: a block's forward less per step, for a higher peak (see above).

    Returns:
        The paths of the checkpointed blocks.

    Raises:
        TypeError: `model` is not a Keras model. ValueError: no block was found.

    Example:
        >>> enable_gradient_checkpointing(lm)  # doctest: +SKIP
        ['gemma_backbone/decoder_block_0', ...]
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"Received an invalid value for `model`, expected a Keras model. Received: model={type(model).__name__}")
    if blocks is not None and not isinstance(blocks, str) and not (
            isinstance(blocks, (list, tuple)) and all(isinstance(b, str) for b in blocks)):
        raise TypeError(f"Received an invalid value for `blocks`, expected None, a regex or a list of layer names. "
                        f"Received: blocks={blocks!r}")
    if not isinstance(recompute_last, bool):
        raise TypeError(f"Received an invalid value for `recompute_last`, expected a bool. "
                        f"Received: recompute_last={recompute_last!r}")
    found = _blocks(model, blocks)
    if not found:
        raise ValueError(
            f"Received blocks={blocks!r}, which found no block to checkpoint in {model.name!r} (no KerasHub transformer "
            "block or nested Functional model); name the block layers with `blocks=`."
        )
    if not recompute_last and len(found) > 1:
        # Undone if an earlier call checkpointed it, so the result says what runs.
        *found, (_, last) = found
        if isinstance(last.__dict__.get("call"), _RecomputedCall):
            object.__delattr__(last, "call")
    for _, layer in found:
        if not isinstance(layer.__dict__.get("call"), _RecomputedCall):
            with _compat.unlocked(layer):
                object.__setattr__(layer, "call", _RecomputedCall(layer))
    if hasattr(model, "reset_compiled_functions"):
        model.reset_compiled_functions()
    else:
        _compat.reset_traced_functions(model)
    return [path for path, _ in found]


def disable_gradient_checkpointing(model: keras.Model) -> None:
    """Undoes `enable_gradient_checkpointing`."""
    for _, layer, _ in surgery.walk(model):
        if isinstance(layer.__dict__.get("call"), _RecomputedCall):
            object.__delattr__(layer, "call")
    if hasattr(model, "reset_compiled_functions"):
        model.reset_compiled_functions()


def checkpointed_blocks(model: keras.Model) -> List[str]:
    """Paths of the blocks whose forward is recomputed in the backward pass."""
    return [path for path, layer, _ in surgery.walk(model) if isinstance(layer.__dict__.get("call"), _RecomputedCall)]
