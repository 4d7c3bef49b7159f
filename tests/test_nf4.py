"""Tests for tf_lora.nf4: NumPy reference of the same rules, and a bitsandbytes fixture.

`fixtures/bnb_nf4.npz` was made by `fixtures/make_bnb_fixture.py` (torch 2.13.0 CPU +
bitsandbytes); no torch is needed here.
"""

import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tf_lora import nf4

FIXTURE = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "bnb_nf4.npz"))
CASES = sorted({k.split("__")[0] for k in FIXTURE.files if "__" in k and not k.startswith("input__")})
BNB_FIELDS = ("weight", "absmax", "quant_map", "blocksize", "shape", "dtype", "quant_type",
              "nested_absmax", "nested_quant_map", "nested_blocksize", "nested_dtype", "nested_offset")  # fmt: skip

# bitsandbytes functional.get_4bit_type("nf4"), copied independently of the module.
BNB_NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)  # fmt: skip
# The signed dynamic map as bitsandbytes itself produced it (the reference for nf4.DYNAMIC_MAP).
BNB_DYNAMIC = FIXTURE["w64x128_g64_dq__nested_quant_map"]
TINY = np.finfo(np.float32).tiny
NF4_HALF_GAP = float(np.max(np.diff(BNB_NF4))) / 2  # Largest rounding error of a scaled value.
DYN_HALF_GAP = float(np.max(np.diff(BNB_DYNAMIC))) / 2


# ---------------------------------------------------------------- plain NumPy reference


def ref_blockwise(flat, group_size, levels):
    """Per-group absmax and nearest-level indices, one group at a time."""
    mids = (levels[:-1] + levels[1:]) / np.float32(2)
    codes, absmax = [], []
    for start in range(0, flat.size, group_size):
        group = flat[start : start + group_size]
        amax = np.float32(np.max(np.abs(group)))
        scaled = np.clip(group * (np.float32(1) / max(amax, TINY)), -1, 1)
        codes.extend((scaled[:, None] > mids[None, :]).sum(axis=1))  # tie -> lower level
        absmax.append(amax)
    return np.array(codes, np.uint8), np.array(absmax, np.float32)


def ref_quantize(kernel, group_size, double_quant):
    w = np.asarray(kernel, np.float32)
    flat = np.transpose(w, (w.ndim - 1, *range(w.ndim - 1))).reshape(-1)  # torch (out, ...)
    codes, absmax = ref_blockwise(flat, group_size, BNB_NF4)
    padded = list(codes) + [7] * (codes.size % 2)  # odd count: pad with the code of 0.0
    packed = np.array([(padded[i] << 4) | padded[i + 1] for i in range(0, len(padded), 2)], np.uint8)
    out = {"codes": packed, "absmax": absmax}
    if double_quant:
        offset = np.float32(np.float64(absmax).mean())
        qabs, nested = ref_blockwise(absmax - offset, 256, BNB_DYNAMIC)
        out.update(absmax=qabs, nested_scale=nested, offset=offset)
    return out


def ref_absmax(q):
    if "nested_scale" not in q:
        return q["absmax"]
    idx = np.arange(q["absmax"].size)
    return BNB_DYNAMIC[q["absmax"]] * q["nested_scale"][idx // 256] + np.float32(q["offset"])


def ref_dequantize(q, shape, group_size):
    n = int(np.prod(shape))
    codes = [int(b) >> 4 if i % 2 == 0 else int(b) & 15 for b in q["codes"] for i in (0, 1)][:n]
    absmax = ref_absmax(q)
    flat = np.array([BNB_NF4[c] * absmax[i // group_size] for i, c in enumerate(codes)], np.float32)
    return np.moveaxis(flat.reshape(shape[-1], *shape[:-1]), 0, -1)


def np_dequantize(q):
    return np.asarray(nf4.dequantize(q))


def assert_xla_close(actual, expected):
    """XLA (CPU) contracts the double-quant `map[c] * nested_scale + offset` into one fused
    multiply-add (one rounding instead of two), so values may differ by 1 ulp (float32)."""
    np.testing.assert_allclose(actual, expected, rtol=2.5e-7, atol=0)


# ---------------------------------------------------------------- constants


def test_codebook_is_bitsandbytes_nf4():
    assert len(nf4.CODEBOOK) == 16
    np.testing.assert_array_equal(np.asarray(nf4.CODEBOOK, np.float32), BNB_NF4)
    np.testing.assert_array_equal(np.asarray(nf4.CODEBOOK, np.float32), FIXTURE["w64x128_g64_nodq__quant_map"])
    assert nf4.CODEBOOK[7] == 0.0 and nf4.CODEBOOK[0] == -1.0 and nf4.CODEBOOK[15] == 1.0


def test_dynamic_map_equals_bitsandbytes():
    assert nf4.DYNAMIC_MAP.shape == (256,) and nf4.DYNAMIC_MAP.dtype == np.float32
    np.testing.assert_array_equal(nf4.DYNAMIC_MAP, BNB_DYNAMIC)  # bit-exact
    assert np.all(np.diff(nf4.DYNAMIC_MAP) > 0) and nf4.DYNAMIC_MAP[-1] == 1.0
    assert not nf4.DYNAMIC_MAP.flags.writeable


# ---------------------------------------------------------------- quantize / dequantize


@pytest.mark.parametrize("double_quant", [False, True], ids=["nodq", "dq"])
@pytest.mark.parametrize(
    "shape,group_size",
    [((128, 16), 64), ((70, 33), 64), ((40, 2), 64), ((3, 5, 7), 64), ((300, 64), 64), ((9, 11), 7), ((1, 1), 64)],
    ids=["aligned", "partial_groups", "group_crosses_rows", "rank3_odd", "two_nested_blocks", "odd_group", "one"],
)
def test_quantize_matches_reference(shape, group_size, double_quant):
    rng = np.random.default_rng(sum(shape))
    kernel = (rng.standard_normal(shape) * rng.uniform(0.01, 1, shape[-1])).astype(np.float32)
    q = nf4.quantize(kernel, group_size=group_size, double_quant=double_quant)
    ref = ref_quantize(kernel, group_size, double_quant)
    assert set(q.arrays) == set(ref)
    for key, value in ref.items():
        np.testing.assert_array_equal(q.arrays[key], np.asarray(value).reshape(q.arrays[key].shape), err_msg=key)
    assert q.shape == shape and q.group_size == group_size and q.double_quant == double_quant
    # Dequantization: same float32 arithmetic, so exactly equal.
    np.testing.assert_array_equal(np_dequantize(q), ref_dequantize(ref, shape, group_size))


def test_packing_order_first_element_in_high_nibble():
    # Keras (in=3, out=1): torch row [1, -1, 0] -> codes 15, 0, 7 -> 0xF0, then 0x7 + pad 7.
    q = nf4.quantize(np.array([[1.0], [-1.0], [0.0]], np.float32), double_quant=False)
    np.testing.assert_array_equal(q.codes, np.array([0xF0, 0x77], np.uint8))


def test_blocking_follows_torch_layout():
    # Keras (in=2, out=3): torch order is kernel.T flattened: k00, k10, k01, k11, k02, k12.
    kernel = np.array([[1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]], np.float32)
    q = nf4.quantize(kernel, group_size=64, double_quant=False)
    np.testing.assert_array_equal(q.codes, np.array([0xF0, 0x7F, 0x07], np.uint8))
    np.testing.assert_array_equal(np_dequantize(q), kernel)


def test_partial_trailing_group_has_own_scale_and_groups_cross_rows():
    # (in=40, out=2), group 64: group 0 = column 0 + 24 of column 1; group 1 = last 16.
    kernel = np.zeros((40, 2), np.float32)
    kernel[:, 0] = 0.5
    kernel[:24, 1] = 2.0
    kernel[24:, 1] = -0.25
    q = nf4.quantize(kernel, group_size=64, double_quant=False)
    np.testing.assert_array_equal(q.absmax, [2.0, 0.25])
    np.testing.assert_allclose(np_dequantize(q)[24:, 1], -0.25)


def test_odd_count_and_zero_group():
    kernel = np.zeros((3, 5, 7), np.float32)  # 105 elements, all zero: absmax 0, no NaN
    q = nf4.quantize(kernel, group_size=64)
    assert q.codes.shape == (53,) and np.all(q.codes == 0x77)
    out = np_dequantize(q)
    assert out.shape == (3, 5, 7) and np.all(out == 0)
    assert np.all(np.asarray(nf4.fake_quant(kernel)) == 0)


def test_tie_goes_to_lower_code():
    mids = (BNB_NF4[:-1] + BNB_NF4[1:]) / np.float32(2)
    kernel = np.concatenate([[1.0], mids]).astype(np.float32)[:, None]  # absmax 1: scaled == mid
    q = nf4.quantize(kernel, double_quant=False)
    codes = [c >> 4 if i % 2 == 0 else c & 15 for c in q.codes for i in (0, 1)][1:16]
    assert codes == list(range(15))
    np.testing.assert_array_equal(np.asarray(nf4.fake_quant(kernel, double_quant=False)), np_dequantize(q))


def test_double_quant_error_bound():
    rng = np.random.default_rng(0)
    kernel = (rng.standard_normal((512, 96)) * 0.02).astype(np.float32)
    exact = nf4.quantize(kernel, double_quant=False)
    q = nf4.quantize(kernel, double_quant=True)
    assert np.array_equal(q.codes, exact.codes)
    absmax = ref_absmax(q.arrays)
    scale = q.nested_scale[np.arange(absmax.size) // 256]
    err = np.abs(absmax - exact.absmax)
    assert np.all(err <= scale * DYN_HALF_GAP * (1 + 1e-5) + 1e-7 * exact.absmax)
    assert err.max() / exact.absmax.max() < 5e-3  # 8-bit absmax: under half a percent
    diff = np.abs(np_dequantize(q) - np_dequantize(exact))
    assert diff.max() <= err.max() * (1 + 1e-5)


@pytest.mark.parametrize("double_quant", [False, True], ids=["nodq", "dq"])
def test_bits_per_parameter(double_quant):
    kernel = np.random.default_rng(1).standard_normal((1024, 1024)).astype(np.float32)
    bits = nf4.bits_per_parameter(nf4.quantize(kernel, group_size=64, double_quant=double_quant))
    if double_quant:
        assert bits == pytest.approx(4.127, abs=5e-4) and bits <= 4.13
    else:
        assert bits == 4.5


def test_dequantize_tensors_jit_on_variables_and_dtype():
    kernel = np.random.default_rng(2).standard_normal((70, 33)).astype(np.float32)
    q = nf4.quantize(kernel)
    variables = [tf.Variable(a, trainable=False) for a in q.arrays.values()]
    meta = dict(shape=q.shape, group_size=q.group_size, double_quant=True)
    jitted = tf.function(lambda *v: nf4.dequantize_tensors(*v, **meta), jit_compile=True)
    assert_xla_close(jitted(*variables).numpy(), np_dequantize(q))
    half = nf4.dequantize(q, dtype="bfloat16")
    assert half.dtype == tf.bfloat16
    np.testing.assert_array_equal(half.numpy(), tf.cast(np_dequantize(q), tf.bfloat16).numpy())


# ---------------------------------------------------------------- fake_quant


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "xla"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["nodq", "dq"])
@pytest.mark.parametrize("shape", [(70, 33), (4, 6, 25)], ids=["dense", "rank3"])
def test_fake_quant_forward_equals_numpy_roundtrip(shape, double_quant, jit):
    kernel = (np.random.default_rng(3).standard_normal(shape) * 0.1).astype(np.float32)
    fq = lambda x: nf4.fake_quant(x, group_size=32, double_quant=double_quant)  # noqa: E731
    fn = tf.function(fq, jit_compile=True) if jit else fq
    expected = np_dequantize(nf4.quantize(kernel, group_size=32, double_quant=double_quant))
    if jit and double_quant:
        assert_xla_close(np.asarray(fn(tf.constant(kernel))), expected)
    else:
        np.testing.assert_array_equal(np.asarray(fn(tf.constant(kernel))), expected)


def test_fake_quant_keeps_dtype():
    kernel = np.random.default_rng(4).standard_normal((64, 8)).astype(np.float16)
    out = nf4.fake_quant(tf.constant(kernel))
    assert out.dtype == tf.float16
    expected = np_dequantize(nf4.quantize(kernel)).astype(np.float16)
    np.testing.assert_array_equal(out.numpy(), expected)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "xla"])
def test_fake_quant_straight_through_gradient_is_identity(jit):
    rng = np.random.default_rng(5)
    w = tf.Variable(rng.standard_normal((96, 10)).astype(np.float32))
    upstream = tf.constant(rng.standard_normal((96, 10)).astype(np.float32))

    def grad():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(nf4.fake_quant(w) * upstream)
        return tape.gradient(loss, w)

    fn = tf.function(grad, jit_compile=True) if jit else grad
    np.testing.assert_array_equal(fn().numpy(), upstream.numpy())


# ---------------------------------------------------------------- properties

finite32 = st.floats(-(2.0**100), 2.0**100, width=32, allow_subnormal=False)
kernels = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=24), elements=finite32)


@settings(max_examples=30, deadline=None)
@given(kernel=kernels, group_size=st.sampled_from([1, 3, 16, 64]), double_quant=st.booleans())
def test_roundtrip_error_bound(kernel, group_size, double_quant):
    q = nf4.quantize(kernel, group_size=group_size, double_quant=double_quant)
    exact = nf4.quantize(kernel, group_size=group_size, double_quant=False).absmax
    flat_err = np.abs(np.moveaxis(np_dequantize(q) - kernel, -1, 0).reshape(-1))
    absmax_err = np.abs(ref_absmax(q.arrays) - exact) if double_quant else np.zeros_like(exact)
    group = np.arange(flat_err.size) // group_size
    bound = NF4_HALF_GAP * exact[group] * (1 + 1e-5) + absmax_err[group] * (1 + 1e-5) + 1e-37
    assert np.all(flat_err <= bound)


@settings(max_examples=30, deadline=None)
@given(kernel=kernels, group_size=st.sampled_from([1, 5, 64]), double_quant=st.booleans())
def test_bitsandbytes_and_dict_roundtrips(kernel, group_size, double_quant):
    q = nf4.quantize(kernel, group_size=group_size, double_quant=double_quant)
    state = nf4.to_bitsandbytes(q)
    assert state["weight"].shape == ((kernel.size + 1) // 2, 1)
    assert state["shape"] == (kernel.shape[-1], *kernel.shape[:-1])
    for back in (nf4.from_bitsandbytes(state), nf4.NF4Tensor.from_dict(q.to_dict())):
        assert (back.shape, back.group_size, back.double_quant) == (q.shape, q.group_size, q.double_quant)
        assert back.arrays.keys() == q.arrays.keys()
        for key in q.arrays:
            assert back.arrays[key].dtype == q.arrays[key].dtype
            np.testing.assert_array_equal(back.arrays[key], q.arrays[key])


# ---------------------------------------------------------------- bitsandbytes fixture


def _case(case):
    state = {f: FIXTURE[f"{case}__{f}"] for f in BNB_FIELDS if f"{case}__{f}" in FIXTURE.files}
    kernel = FIXTURE["input__" + str(FIXTURE[f"{case}__input_name"])].astype(np.float32).T
    expected = FIXTURE.get(f"{case}__dequantized")
    return state, kernel, None if expected is None else expected.T


@pytest.mark.parametrize("case", CASES)
def test_agrees_with_bitsandbytes(case):
    state, kernel, expected = _case(case)
    dq = "nested_absmax" in state
    q = nf4.quantize(kernel, group_size=int(state["blocksize"]), double_quant=dq)
    np.testing.assert_array_equal(q.codes, state["weight"].reshape(-1))  # 4-bit codes: exact
    loaded = nf4.from_bitsandbytes(state)
    assert loaded.shape == kernel.shape
    if expected is not None:  # bitsandbytes' own dequantize_4bit output, from its state
        np.testing.assert_array_equal(np_dequantize(loaded), expected)
    if not dq:
        np.testing.assert_array_equal(q.absmax, state["absmax"])
        ours = nf4.to_bitsandbytes(q)
        for key in ("weight", "absmax", "quant_map", "blocksize", "shape", "quant_type"):
            np.testing.assert_array_equal(np.asarray(ours[key]), state[key], err_msg=key)
        if expected is not None:
            np.testing.assert_array_equal(np_dequantize(q), expected)
        return
    np.testing.assert_array_equal(q.offset, np.float32(state["nested_offset"]))
    np.testing.assert_array_equal(q.nested_scale, state["nested_absmax"])
    # Second-level codes: bitsandbytes' CPU kernel (division + approximate binary search)
    # picks the neighbouring code for a few values near a midpoint. Allow at most 1% of
    # them, each off by one, and ours never farther from the exact value than theirs.
    ours, theirs = q.absmax.astype(int), state["absmax"].astype(int)
    differ = np.nonzero(ours != theirs)[0]
    assert differ.size <= max(1, 0.01 * ours.size)
    assert np.all(np.abs(ours[differ] - theirs[differ]) == 1)
    exact = nf4.quantize(kernel, group_size=q.group_size, double_quant=False).absmax
    ref_ours, ref_theirs = ref_absmax(q.arrays), ref_absmax({**q.arrays, "absmax": state["absmax"]})
    assert np.all(np.abs(ref_ours - exact) <= np.abs(ref_theirs - exact))


def test_fixture_disagreement_count():
    """Pins the measured agreement: 1 second-level code of 300 differs, no first-level code."""
    counts = {}
    for case in CASES:
        state, kernel, _ = _case(case)
        if "nested_absmax" in state:
            q = nf4.quantize(kernel, group_size=int(state["blocksize"]))
            counts[case] = int(np.sum(q.absmax != state["absmax"]))
    assert sum(counts.values()) == 1 and counts["w150x128_g64_dq"] == 1


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("source", ["numpy", "tf_variable", "keras_variable"])
@pytest.mark.parametrize(
    "shape,group_size",
    [((128, 16), 64), ((70, 33), 64), ((40, 2), 64), ((3, 5, 7), 64), ((9, 11), 7), ((5, 3), 4)],
    ids=["aligned", "partial_groups", "group_crosses_rows", "rank3_odd", "odd_group", "rows_shorter_than_group"],
)
def test_quantize_in_slices_matches_reference(monkeypatch, shape, group_size, source):
    """Quantizing a few output units at a time (and reading variables slice by slice)
    gives the same arrays as the whole-kernel reference, groups crossing rows included."""
    import keras

    monkeypatch.setattr(nf4, "_CHUNK", 16)  # several slices even for these small kernels
    rng = np.random.default_rng(sum(shape))
    kernel = (rng.standard_normal(shape) * rng.uniform(0.01, 1, shape[-1])).astype(np.float32)
    wrap = {"numpy": lambda k: k, "tf_variable": tf.Variable, "keras_variable": keras.Variable}[source]
    q = nf4.quantize(wrap(kernel), group_size=group_size, double_quant=True)
    ref = ref_quantize(kernel, group_size, True)
    for key, value in ref.items():
        np.testing.assert_array_equal(q.arrays[key], np.asarray(value).reshape(q.arrays[key].shape), err_msg=key)
    assert q.shape == shape


def test_non_finite_values_are_counted_over_all_slices(monkeypatch):
    monkeypatch.setattr(nf4, "_CHUNK", 16)
    kernel = np.ones((8, 32), np.float32)
    kernel[0, 0], kernel[5, 31] = np.nan, np.inf  # the first and the last slice
    with pytest.raises(ValueError, match="contains 2 NaN or Inf"):
        nf4.quantize(tf.constant(kernel), name="block/ffw")


@pytest.mark.parametrize(
    "group_size,error",
    [(0, ValueError), (-64, ValueError), (64.0, TypeError), ("64", TypeError), (True, TypeError), (None, TypeError)],
    ids=["zero", "negative", "float", "string", "bool", "none"],
)
@pytest.mark.parametrize("fn", [nf4.quantize, nf4.fake_quant], ids=["quantize", "fake_quant"])
def test_bad_group_size(fn, group_size, error):
    with pytest.raises(error, match="group_size"):
        fn(np.ones((8, 8), np.float32), group_size=group_size)


def test_group_size_message_style():
    with pytest.raises(ValueError) as info:
        nf4.quantize(np.ones((8, 8), np.float32), group_size=0)
    assert str(info.value) == (
        "Received an invalid value for `group_size`, expected a positive integer. Received: group_size=0"
    )


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "neg_inf"])
def test_non_finite_kernel_names_layer(value):
    kernel = np.ones((8, 8), np.float32)
    kernel[3, 4] = value
    with pytest.raises(ValueError, match="encoder/query"):
        nf4.quantize(kernel, name="encoder/query")


@pytest.mark.parametrize(
    "kernel,error",
    [(np.ones((8, 8), np.int32), TypeError), (np.ones((8, 8), bool), TypeError),
     (np.array([["a"]]), TypeError), (np.zeros((0, 8), np.float32), ValueError),
     (np.float32(1.0), ValueError)],
    ids=["int", "bool", "string", "empty", "scalar"],
)  # fmt: skip
def test_bad_kernel(kernel, error):
    with pytest.raises(error, match="kernel"):
        nf4.quantize(kernel)


def test_fake_quant_rejects_int_kernel():
    with pytest.raises(TypeError, match="kernel"):
        nf4.fake_quant(tf.ones((8, 8), tf.int32))


def test_double_quant_must_be_bool():
    with pytest.raises(TypeError, match="double_quant"):
        nf4.quantize(np.ones((8, 8), np.float32), double_quant="yes")


def _dq_state():
    return dict(_case("w33x71_g64_dq")[0])


@pytest.mark.parametrize(
    "change,field,error",
    [
        (lambda s: s.update(weight=s["weight"][:-1]), "weight", ValueError),
        (lambda s: s.update(weight=s["weight"].astype(np.int8)), "weight", ValueError),
        (lambda s: s.update(absmax=s["absmax"][:-1]), "absmax", ValueError),
        (lambda s: s.update(blocksize=128), "absmax", ValueError),
        (lambda s: s.update(blocksize=0), "blocksize", ValueError),
        (lambda s: s.update(shape=(33, 72)), "weight", ValueError),
        (lambda s: s.update(shape=(33, -71)), "shape", ValueError),
        (lambda s: s.pop("shape"), "shape", ValueError),
        (lambda s: s.update(nested_blocksize=128), "nested_blocksize", ValueError),
        (lambda s: s.update(nested_absmax=np.ones(2, np.float32)), "nested_absmax", ValueError),
        (lambda s: s.update(nested_quant_map=np.linspace(-1, 1, 256)), "nested_quant_map", ValueError),
        (lambda s: s.update(nested_quant_map=BNB_DYNAMIC[:255]), "nested_quant_map", ValueError),
        (lambda s: s.update(quant_map=BNB_NF4[::-1]), "quant_map", ValueError),
        (lambda s: s.pop("nested_offset"), "nested_offset", ValueError),
        (lambda s: s.update(quant_type="int4"), "quant_type", ValueError),
        (lambda s: s.update(quant_type="fp4"), "fp4", NotImplementedError),
        (lambda s: s.update(dtype="int8"), "dtype", ValueError),
    ],
    ids=["weight_size", "weight_dtype", "absmax_size", "blocksize_mismatch", "blocksize_zero",
         "shape_mismatch", "shape_negative", "shape_missing", "nested_blocksize",
         "nested_absmax_size", "nested_quant_map", "nested_quant_map_size", "quant_map", "offset_missing",
         "quant_type_unknown", "quant_type_fp4", "dtype"],
)  # fmt: skip
def test_bad_bitsandbytes_state(change, field, error):
    state = _dq_state()
    change(state)
    with pytest.raises(error, match=field):
        nf4.from_bitsandbytes(state)


def test_offset_alias_and_nf4tensor_validation():
    state = _dq_state()
    state["offset"] = state.pop("nested_offset")
    q = nf4.from_bitsandbytes(state)
    assert q.double_quant and q.shape == (71, 33)
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.group_size = 32
    assert not q.codes.flags.writeable
    config = q.to_dict()
    with pytest.raises(ValueError, match="nested_scale"):
        nf4.NF4Tensor.from_dict({**config, "nested_scale": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match="codes"):
        nf4.NF4Tensor.from_dict({**config, "shape": (71, 34)})


def test_bitsandbytes_conversion_module_is_reexported():
    """`nf4.to_bitsandbytes` / `nf4.from_bitsandbytes` live in `tf_lora.nf4_bitsandbytes`; the old
    names keep working."""
    from tf_lora import nf4_bitsandbytes

    assert nf4.to_bitsandbytes is nf4_bitsandbytes.to_bitsandbytes
    assert nf4.from_bitsandbytes is nf4_bitsandbytes.from_bitsandbytes
