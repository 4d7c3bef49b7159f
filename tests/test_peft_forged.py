"""Loaders stay hardened for PEFT directories (issue 13): forged or damaged ones.

Hypothesis forges PEFT directories from the real llama fixtures (plain LoRA, and LoRA +
`modules_to_save=["lm_head"]`): safetensors headers with huge or negative shapes and
offsets, other dtypes, a lying header length, truncated or flipped bytes, tensors with
wrong shapes or NaN, and ``adapter_config.json`` values of the wrong type. Each one,
through `load_adapter` into an adapted model and `peft.plan` (all that `from_peft` reads the
directory with) on the base model, either loads cleanly or raises a plain exception (ValueError, TypeError, NotImplementedError, OSError)
that names the file; the model is unchanged when it raises; and nothing allocates more
than a few megabytes whatever the header claims (tracemalloc, on the forged weight files).
"""

import json
import math
import os
import shutil
import struct
import tempfile
import tracemalloc

import keras_hub
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import tf_lora
from tf_lora.interop import peft as tf_peft
from tf_lora.layers.lora import LoRALayer
from tf_lora.surgery import walk

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "peft", "llama")
SOURCES = ["adapter", "adapter_lm_head"]
PLAIN = (ValueError, TypeError, NotImplementedError, OSError)
NAMES = ("adapter_config.json", "adapter_model.safetensors")
PEAK_BYTES = 8 << 20  # the files are ~20 kB; a forged header must not make the loader allocate what it claims
# 375 forged directories here + 4 huge headers below + test_peft.py's 21 named bad inputs = issue 13's 400.
EXAMPLES = int(os.environ.get("TF_LORA_FORGED_EXAMPLES", 375))


@pytest.fixture(scope="module")
def models():
    """{source: (base CausalLM, the same adapted from that source's directory)}, reused by every example."""
    backbone = keras_hub.models.Llama3Backbone.from_preset(os.path.join(FIXTURES, "base"))
    base = keras_hub.models.Llama3CausalLM(backbone, preprocessor=None)
    return {s: (base, tf_lora.from_peft(base, os.path.join(FIXTURES, s))) for s in SOURCES}


# -- forging ------------------------------------------------------------------------------------------------
def _split(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header, body: bytes, length=None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + body


_INTS = st.one_of(st.integers(-3, 70), st.sampled_from([2**31, 2**40, 2**63 - 1, -(2**62)]))
_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), _INTS, st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
              st.sampled_from(["q_proj", "all-linear", "(", "lm_head", "layers", "*"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)
_CONFIG_FIELDS = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "layers_to_transform",
                  "layers_pattern", "use_rslora", "lora_dropout", "modules_to_save", "exclude_modules", "peft_type",
                  "ensure_weight_tying", "bias", "init_lora_weights", "task_type", "base_model_name_or_path",
                  "fan_in_fan_out", "use_dora", "target_parameters", "trainable_token_indices"]


@st.composite
def header_forgery(draw):
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "key", "drop", "length", "header", "metadata"]))
    values = {
        "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "F64", "I32", "U8", "BOOL", "F8_E4M3", "f32", ""]),
                           _JSON),
        "shape": st.one_of(st.lists(_INTS, max_size=4), _JSON),
        "data_offsets": st.one_of(st.lists(_INTS, min_size=2, max_size=2), st.lists(_INTS, max_size=3), _JSON),
        "key": st.sampled_from(["base_model.model.model.layers.9.mlp.up_proj.lora_A.weight", "x", "",
                                "base_model.model.lm_head.weight", "base_model.model.model.norm.weight",
                                "base_model.model.model.layers.0.mlp.up_proj.lora_A.bias"]),
        "drop": st.just(None),
        "length": st.one_of(_INTS, st.integers(0, 4000)),
        "header": _JSON,
        "metadata": _JSON,
    }
    return field, draw(st.integers(0, 1000)), draw(values[field])


def forge_header(data: bytes, field, pick, value) -> bytes:
    header, body = _split(data)
    keys = sorted(k for k in header if k != "__metadata__")
    key = keys[pick % len(keys)]
    if field in ("dtype", "shape", "data_offsets"):
        header[key][field] = value
    elif field == "key":
        header[value] = header.pop(key)
    elif field == "drop":
        del header[key]
    elif field == "length":
        return _join(header, body, length=value % 2**64)
    elif field == "header":
        header = value
    else:
        header["__metadata__"] = value
    return _join(header, body)


@st.composite
def tensor_forgery(draw):
    how = draw(st.sampled_from(["nan", "inf", "transpose", "extra_axis", "drop_row", "float16", "bfloat16", "float64",
                                "int32", "empty"]))
    return how, draw(st.integers(0, 1000))


def forge_tensor(path, how, pick):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path)
    key = sorted(tensors)[pick % len(tensors)]
    t = tensors[key]
    if how in ("nan", "inf"):
        t = t.copy()
        t.flat[pick % t.size] = np.nan if how == "nan" else -np.inf
    elif how == "transpose":
        t = np.ascontiguousarray(t.T)
    elif how == "extra_axis":
        t = t[None]
    elif how == "drop_row":
        t = np.ascontiguousarray(t[1:])
    elif how == "empty":
        t = np.zeros((0,) + t.shape[1:], t.dtype)
    elif how == "bfloat16":  # safetensors.numpy has no bfloat16: write the header by hand
        raw = (t.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header, body = _split(open(path, "rb").read())
        start, end = header[key]["data_offsets"]
        body = body[:start] + raw + body[end:]
        shift = len(raw) - (end - start)
        for k, info in header.items():
            if k != "__metadata__" and info["data_offsets"][0] > start:
                info["data_offsets"] = [info["data_offsets"][0] + shift, info["data_offsets"][1] + shift]
        header[key] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [start, start + len(raw)]}
        open(path, "wb").write(_join(header, body))
        return
    else:
        t = t.astype(how)
    tensors[key] = t
    save_file(tensors, path)


@st.composite
def byte_damage(draw):
    return draw(st.sampled_from(["truncate", "flip", "insert"])), draw(st.integers(0, 10**6)), draw(st.integers(0, 255))


def damage_bytes(path, how, where, byte):
    data = bytearray(open(path, "rb").read())
    at = where % (len(data) + 1)
    if how == "truncate":
        data = data[:at]
    elif how == "flip" and data:
        data[at % len(data)] ^= byte or 1
    else:
        data[at:at] = bytes([byte])
    open(path, "wb").write(bytes(data))


@st.composite
def config_damage(draw):
    how = draw(st.sampled_from(["set", "set", "set", "drop", "replace", "bytes"]))
    return how, draw(st.sampled_from(_CONFIG_FIELDS)), draw(_JSON)


def damage_config(path, how, field, value):
    if how == "bytes":
        open(path, "wb").write(b"\xff\xfe{" + json.dumps(value).encode())
        return
    config = json.load(open(path))
    if how == "set":
        config[field] = value
    elif how == "drop":
        config.pop(field, None)
    else:
        config = value
    open(path, "w").write(json.dumps(config))  # NaN / Infinity as Python's json writes (and PEFT reads) them


FORGERY = st.one_of(
    st.tuples(st.just("header"), header_forgery()),
    st.tuples(st.just("tensor"), tensor_forgery()),
    st.tuples(st.just("bytes"), byte_damage()),
    st.tuples(st.just("config"), config_damage()),
    st.tuples(st.just("config"), config_damage()),
)


def forge(directory, kind, args):
    weights, config = os.path.join(directory, "adapter_model.safetensors"), os.path.join(directory, "adapter_config.json")
    if kind == "header":
        data = open(weights, "rb").read()
        open(weights, "wb").write(forge_header(data, *args))
    elif kind == "tensor":
        forge_tensor(weights, *args)
    elif kind == "bytes":
        damage_bytes(weights, *args)
    else:
        damage_config(config, *args)


# -- the property ---------------------------------------------------------------------------------------------
def _snapshot(model):
    return [v.numpy().copy() for v in model.weights]


def _unchanged(before, model):
    return len(before) == len(model.weights) and all(np.array_equal(b, v.numpy(), equal_nan=True)
                                                     for b, v in zip(before, model.weights))


def _attempt(call, model, directory, trace=True):
    """(error or None, peak bytes (0 untraced)); a raise must leave `model` as it was and name the directory or a file."""
    before = _snapshot(model)
    if trace:
        tracemalloc.start()
    try:
        call()
        error = None
    except PLAIN as e:
        error = e
    finally:
        peak = tracemalloc.get_traced_memory()[1] if trace else 0
        tracemalloc.stop()
    if error is not None:
        assert _unchanged(before, model), f"{type(error).__name__}: {error} -- but the model changed"
        assert any(n in str(error) for n in NAMES + (os.fspath(directory),)), f"the error names no file: {error!r}"
    return error, peak, before


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
@given(source=st.sampled_from(SOURCES), forgery=FORGERY)
def test_forged_peft_directory_is_refused_plainly_or_loads_cleanly(models, source, forgery):
    base, adapted = models[source]
    directory = tempfile.mkdtemp()
    try:
        shutil.copytree(os.path.join(FIXTURES, source), directory, dirs_exist_ok=True)
        forge(directory, *forgery)
        trace = forgery[0] != "config"  # what a file's header claims could make a loader allocate; tracemalloc is slow
        error, peak, _ = _attempt(lambda: tf_lora.load_adapter(adapted, directory), adapted, directory, trace)
        event(f"{forgery[0]}: {'loaded' if error is None else type(error).__name__}")
        assert peak < PEAK_BYTES, peak
        # from_peft reads a directory only through peft.plan (then adapts from the checked plan,
        # which test_peft.py covers): plan it against the base model too, faster than cloning it.
        plan_error, peak, _ = _attempt(lambda: tf_peft.plan(base, directory), base, directory, trace)
        assert peak < PEAK_BYTES, peak
        if error is None:  # it loaded: the plan from the base agrees with what was loaded
            assert plan_error is None
            steps = tf_peft.plan(base, directory)
            layers = {p: layer for p, layer, _ in walk(adapted)}
            for path, (a, b) in steps.weights.items():
                np.testing.assert_array_equal(layers[path].lora_a.numpy(), a)
                np.testing.assert_array_equal(layers[path].lora_b.numpy(), b)
            tf_lora.load_adapter(adapted, os.path.join(FIXTURES, source))  # back to the fixture for the next example
        assert not isinstance(base, tf_lora.AdaptedModel)
        assert not [p for p, layer, _ in walk(base) if isinstance(layer, LoRALayer)]
    finally:
        shutil.rmtree(directory)


@pytest.mark.parametrize("shape", [[2**31, 2**31], [2**62, 4], [-(2**31), -(2**31)], [2**64 + 1]],
                         ids=["4e18_elements", "overflowing_bytes", "negative", "beyond_uint64"])
def test_a_header_claiming_a_huge_tensor_allocates_nothing_large(models, shape, tmp_path):
    """The header says exabytes, the file has kilobytes: refused before any allocation."""
    shutil.copytree(os.path.join(FIXTURES, "adapter"), tmp_path / "d")
    path = tmp_path / "d" / "adapter_model.safetensors"
    header, body = _split(path.read_bytes())
    key = sorted(k for k in header if k != "__metadata__")[0]
    header[key]["shape"] = shape
    header[key]["data_offsets"] = [0, 4 * abs(math.prod(shape))]
    path.write_bytes(_join(header, body))
    base, adapted = models["adapter"]
    for model, call in ((adapted, lambda: tf_lora.load_adapter(adapted, str(tmp_path / "d"))),
                        (base, lambda: tf_lora.from_peft(base, str(tmp_path / "d"), inplace=True))):
        error, peak, _ = _attempt(call, model, tmp_path)
        assert isinstance(error, ValueError) and "adapter_model.safetensors" in str(error)
        assert peak < PEAK_BYTES, peak
