"""Replacing a layer in place (`become`), snapshots, rebinding closures, name scopes. (Part of `tf_lora._compat`: private Keras / TensorFlow APIs.)"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import keras

from tf_lora._compat.layers import own_variables


_GRAPH_STATE = ("_inbound_nodes", "_outbound_nodes", "_build_shapes_dict")


def become(old, new) -> None:
    """Turns the object `old` into `new` in place: same identity, `new`'s class and state.

    Every reference to `old` anywhere (parent attributes, tracked sublayer lists,
    TensorFlow checkpoint dependencies, Functional graph nodes) now sees the new
    layer, without finding or editing any of them. `old`'s own state (its
    variables included) is dropped, so memory held only by it is freed; its place
    in the model graph (inbound/outbound nodes, build shapes) is kept. The
    functions Keras' `Layer.__new__` put on `new` (`build` and `quantize`, closures
    over the instance) are rebound to `old`. `new` must not be used afterwards.
    Build `new` inside `scope_of(old)` so that its variables get `old`'s paths.
    """
    graph_state = {k: old.__dict__[k] for k in _GRAPH_STATE if k in old.__dict__}
    old_tracker = old.__dict__.get("_tracker")
    state = {k: _rebound(v, new, old) for k, v in new.__dict__.items()}
    new.__dict__.clear()
    old.__dict__.clear()
    old.__dict__.update(state)
    old.__dict__.update(graph_state)
    old.__class__ = type(new)
    # The kept containers are Keras TrackedList/TrackedDicts that point at `old`'s tracker,
    # which holds `old`'s variable lists: left there, they would keep the replaced weights alive.
    _retrack(list(graph_state.values()), old_tracker, state.get("_tracker"))


def snapshot(layer) -> tuple:
    """What `restore` needs to undo a later `become(layer, ...)`: the class and state
    (it keeps the state, variables included, alive until dropped)."""
    return type(layer), dict(layer.__dict__)


def restore(layer, saved: tuple) -> None:
    """Undoes `become(layer, ...)`: `layer` gets back the class and state `snapshot`
    saved (the same variables and sublayers), and its graph containers its tracker."""
    cls, state = saved
    current_tracker = layer.__dict__.get("_tracker")
    graph_state = [layer.__dict__[k] for k in _GRAPH_STATE if k in layer.__dict__]
    layer.__dict__.clear()
    layer.__dict__.update(state)
    layer.__class__ = cls
    _retrack(graph_state, current_tracker, state.get("_tracker"))


def _rebound(value, new, old, _active=frozenset()):
    """`value` with every reference to `new` in its closure (and in `functools.wraps`'
    `__wrapped__`) pointed at `old`: Keras' `Layer.__new__` stores per-instance
    `build`/`quantize` wrappers that close over the instance and its bound methods.
    A value that does not refer to `new` is returned as it is."""
    if isinstance(value, types.MethodType):
        return types.MethodType(value.__func__, old) if value.__self__ is new else value
    if not isinstance(value, types.FunctionType) or id(value) in _active:  # (a recursive closure)
        return value
    _active = _active | {id(value)}
    cells = []
    for cell in value.__closure__ or ():
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell
            cells.append(cell)
            continue
        rebound = old if content is new else _rebound(content, new, old, _active)
        cells.append(cell if rebound is content else types.CellType(rebound))
    wrapped = value.__dict__.get("__wrapped__")
    rewrapped = _rebound(wrapped, new, old, _active) if wrapped is not None else None
    if rewrapped is wrapped and all(c is o for c, o in zip(cells, value.__closure__ or ())):
        return value
    fn = types.FunctionType(value.__code__, value.__globals__, value.__name__, value.__defaults__, tuple(cells) or None)
    fn.__kwdefaults__, fn.__qualname__, fn.__doc__ = value.__kwdefaults__, value.__qualname__, value.__doc__
    fn.__dict__.update(value.__dict__)
    if wrapped is not None:
        fn.__wrapped__ = rewrapped
    return fn


def _retrack(values, old_tracker, new_tracker) -> None:
    """Points the Keras tracked containers in `values` (nested) from `old_tracker` to `new_tracker`."""
    stack, seen = list(values), set()
    while stack:
        value = stack.pop()
        if id(value) in seen or not isinstance(value, (list, tuple, dict, set)):
            continue
        seen.add(id(value))
        if old_tracker is not None and getattr(value, "tracker", None) is old_tracker:
            value.tracker = new_tracker
        stack.extend(value.values() if isinstance(value, dict) else value)


def parent_path(layer) -> str:
    """The variable-path prefix `layer` was built under (``"block/attention"`` for a
    layer whose kernel's path is ``"block/attention/query/kernel"``; "" at the top)."""
    parent = layer.__dict__.get("_parent_path")  # Keras records it on the first build or call
    if parent is not None:
        return parent
    path = layer.__dict__.get("_path")
    if not path:  # older Keras: read it off the layer's own variables ('<parent>/<name>/<variable>')
        path = next((v.path[: -len(v.name) - 1] for v in own_variables(layer)
                     if v.path.endswith("/" + v.name)), layer.name)
    return path[: -len(layer.name) - 1] if path.endswith("/" + layer.name) else ""


@contextlib.contextmanager
def scope_of(layer) -> Iterator[None]:
    """Opens the name scope `layer` was built in: a layer created and built inside
    (e.g. `layer`'s replacement) gets the variable paths `layer`'s variables have."""
    with name_scope_at(parent_path(layer)):
        yield


@contextlib.contextmanager
def name_scope_at(path: str) -> Iterator[None]:
    """Opens Keras name scopes so that variables created inside get paths ``path/<name>``
    (whatever scope is open around; on Keras without `override_parent`, below it)."""
    parts = [p for p in path.split("/") if p]
    with contextlib.ExitStack() as stack:
        for i, part in enumerate(parts):
            try:
                scope = keras.name_scope(part, override_parent="" if i == 0 else None)
            except TypeError:  # pragma: no cover - a Keras whose name_scope takes no override_parent
                scope = keras.name_scope(part)
            stack.enter_context(scope)
        yield


@contextlib.contextmanager
def own_scope(layer) -> Iterator[None]:
    """Opens `layer`'s own name scope (as its `build` does), so that a variable it adds
    after its build gets the path ``<layer path>/<name>`` like those made in `build`."""
    with name_scope_at(f"{parent_path(layer)}/{layer.name}"):
        yield


# Traced functions a model caches; they capture variables and the Python-level
# adapter choice, so they are dropped whenever the adapters change.
