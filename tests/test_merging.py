"""`tf_lora.add_weighted_adapter` against a NumPy reference of PEFT's formulas, written here
in PEFT's own layout (lora_A (r, in), lora_B (out, r)), and, when torch + peft are
installed, against PEFT's `add_weighted_adapter` on the same weights.

Tolerances: 1e-6 for the factor-wise methods (float32 sums), 1e-5 for SVD products."""

import keras
import numpy as np
import pytest

import tf_lora
from models import mha_classifier

X = np.random.default_rng(1).standard_normal((4, 6, 8)).astype("float32")


def _model(rank_b=2, targets_b=("query", "value", "ffn")):
    keras.utils.set_random_seed(0)
    model = tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(rank=2, alpha=4, target_modules=("query", "value", "ffn")))
    tf_lora.add_adapter(model, "b", tf_lora.LoRAConfig(rank=rank_b, alpha=3, target_modules=targets_b))
    rng = np.random.default_rng(0)
    for _, layer in model.adapter_layers():
        for name in layer.adapter_names:
            for v in layer.adapter_variables(name):
                v.assign(rng.normal(0, 0.5, v.shape).astype("float32"))
    return model


# --- a NumPy reference in PEFT's layout (peft/utils/merge_utils.py) -----------------
def _peft_factors(layer, name):
    a, b = (np.asarray(v) for v in layer.adapter_variables(name))
    r = a.shape[-1]
    return a.reshape(-1, r).T, b.reshape(r, -1).T  # lora_A (r, in), lora_B (out, r)


def _ref_prune_magnitude(t, density):
    k = int(density * t.size)
    keep = np.zeros(t.size)
    keep[np.argsort(-np.abs(t).reshape(-1), kind="stable")[:k]] = 1
    return t * keep.reshape(t.shape)


def _ref_combine(method, tensors, weights, density):
    if method in ("ties", "magnitude_prune"):
        tensors = [_ref_prune_magnitude(t, density) for t in tensors]
    stacked = np.stack(tensors)
    weighted = stacked * np.asarray(weights).reshape(-1, 1, 1)
    if method == "ties":
        elected = np.where(stacked.sum(0) >= 0, 1, -1)
        mask = np.sign(stacked) == elected
        return (weighted * mask).sum(0) / np.maximum(mask.sum(0), 1)
    return weighted.sum(0)


def _scaling(layer, name):
    spec = layer._spec(name)
    return spec["alpha"] / spec["rank"]


@pytest.mark.parametrize("method,density", [("linear", None), ("ties", 0.5), ("magnitude_prune", 0.3)])
def test_task_arithmetic_family_matches_numpy_reference(method, density):
    model = _model()
    weights = [0.7, 0.4]
    tf_lora.add_weighted_adapter(model, ["default", "b"], weights, "merged", combination=method, density=density)
    for path, layer in model.adapter_layers():
        ws = [np.sqrt(w * _scaling(layer, n)) for n, w in zip(["default", "b"], weights)]
        factors = [_peft_factors(layer, n) for n in ["default", "b"]]
        ref_a = _ref_combine(method, [f[0] for f in factors], ws, density)
        ref_b = _ref_combine(method, [f[1] for f in factors], ws, density)
        got_a, got_b = _peft_factors(layer, "merged")
        np.testing.assert_allclose(got_a, ref_a, atol=1e-6, err_msg=path)
        np.testing.assert_allclose(got_b, ref_b, atol=1e-6, err_msg=path)
        assert layer._spec("merged")["alpha"] == layer._spec("merged")["rank"] == 2  # scaling 1, as PEFT


def _matrix(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.reshape(-1, a.shape[-1]) @ b.reshape(b.shape[0], -1)


def _deltas(layer, names_weights):
    return sum(w * layer.lora_delta(n) for n, w in names_weights)


def test_cat_is_exactly_the_weighted_sum_of_updates_and_serves_it():
    model = _model(rank_b=3)
    tf_lora.add_weighted_adapter(model, ["default", "b"], [1.0, 0.5], "both", combination="cat")
    for path, layer in model.adapter_layers():
        assert layer._spec("both")["rank"] == 5
        np.testing.assert_allclose(layer.lora_delta("both"), _deltas(layer, [("default", 1.0), ("b", 0.5)]),
                                   atol=1e-5, err_msg=path)
    # The model's output with the merged adapter equals merging both updates into the kernels.
    tf_lora.set_adapter(model, "both")
    expected = tf_lora.merge(model)(X)
    np.testing.assert_allclose(np.asarray(model(X)), np.asarray(expected), atol=1e-5)


def test_svd_truncates_the_weighted_update_to_its_top_singular_triplets():
    model = _model(rank_b=3)
    tf_lora.add_weighted_adapter(model, ["default", "b"], [1.0, -0.5], "low", combination="svd", svd_rank=2)
    tf_lora.add_weighted_adapter(model, ["default", "b"], [1.0, -0.5], "full", combination="svd", svd_rank=5)
    for path, layer in model.adapter_layers():
        delta = _deltas(layer, [("default", 1.0), ("b", -0.5)])
        np.testing.assert_allclose(layer.lora_delta("full"), delta, atol=1e-5, err_msg=path)  # rank 5 >= 2 + 3: exact
        # The best rank-2 approximation (Eckart-Young) of the update as an (input, output) matrix.
        matrix = sum(w * _scaling(layer, n) * _matrix(*layer.adapter_variables(n)) for n, w in [("default", 1.0), ("b", -0.5)])
        u, s, vt = np.linalg.svd(matrix)
        np.testing.assert_allclose(_matrix(*layer.adapter_variables("low")), (u[:, :2] * s[:2]) @ vt[:2], atol=1e-5,
                                   err_msg=path)
        assert layer._spec("low")["rank"] == 2


def test_dare_methods_match_numpy_reference_with_the_same_masks():
    model = _model()
    weights, density, seed = [1.0, 0.6], 0.5, 7
    tf_lora.add_weighted_adapter(model, ["default", "b"], weights, "dl", combination="dare_linear", density=density, seed=seed)
    tf_lora.add_weighted_adapter(model, ["default", "b"], weights, "dt", combination="dare_ties", density=density, seed=seed)
    for method, name in (("dare_linear", "dl"), ("dare_ties", "dt")):
        rng = np.random.default_rng(seed)  # the masks are drawn in layer order, A then B, adapter by adapter
        for path, layer in model.adapter_layers():
            ws = np.array([np.sqrt(w * _scaling(layer, n)) for n, w in zip(["default", "b"], weights)])
            got = [np.asarray(v) for v in layer.adapter_variables(name)]
            for i in range(2):
                tensors = [np.asarray(layer.adapter_variables(n)[i]) for n in ["default", "b"]]
                pruned = np.stack([t * (rng.random(t.shape) < density) / density for t in tensors])
                weighted = pruned * ws.reshape((-1,) + (1,) * tensors[0].ndim)
                if method == "dare_ties":
                    mask = np.sign(pruned) == np.where(pruned.sum(0) >= 0, 1, -1)
                    ref = (weighted * mask).sum(0) / np.maximum(mask.sum(0), 1)
                else:
                    ref = weighted.sum(0)
                np.testing.assert_allclose(got[i], ref, atol=1e-6, err_msg=f"{method} {path}")
                kept = np.mean(got[i] != 0)
                assert 0.2 < kept < 0.95, kept  # pruning happened


def test_merged_adapter_saves_loads_and_trains():
    model = _model()
    tf_lora.add_weighted_adapter(model, ["default", "b"], [1.0, 1.0], "both", combination="linear")
    tf_lora.set_adapter(model, "both")
    out = np.asarray(model(X))
    import tempfile, os

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "both.adapter")
        tf_lora.save_adapter(model, path, adapter_name="both")
        fresh = _model()
        tf_lora.add_adapter(fresh, "both", model.adapter_config("both"))
        tf_lora.load_adapter(fresh, path, adapter_name="both")
        tf_lora.set_adapter(fresh, "both")
        np.testing.assert_allclose(np.asarray(fresh(X)), out, atol=1e-6)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(X, np.array([0, 1, 2, 1]), epochs=1, verbose=0)
    assert {v.name for v in model.trainable_variables} == {"lora_a_both", "lora_b_both"}


def _state(model):
    return {id(v): np.asarray(v).copy() for v in model.weights}, list(model.adapter_names)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"combination": "mean"}, "combination"),
        ({"combination": "ties", "density": 0.0}, "density"),
        ({"combination": "ties", "density": 1.5}, "density"),
        ({"combination": "ties"}, "density"),
        ({"combination": "linear", "density": 0.5}, "density"),
        ({"weights": [1.0]}, "weights"),
        ({"weights": [1.0, float("nan")]}, "weights"),
        ({"adapters": ["default", "nope"]}, "adapter_name"),
        ({"adapters": "default"}, "adapters"),
        ({"combination": "cat", "svd_rank": 2}, "svd_rank"),
        ({"name": "b"}, "adapter_name"),
    ],
    ids=["unknown_combination", "density_zero", "density_above_one", "density_missing", "density_unused",
         "weights_count", "weights_nan", "unknown_adapter", "adapters_str", "svd_rank_without_svd", "existing_name"],
)
def test_bad_input_names_the_argument_and_changes_nothing(kwargs, match):
    model = _model()
    before, names = _state(model)
    args = {"adapters": ["default", "b"], "weights": [1.0, 1.0], "name": "new", "combination": "linear", **kwargs}
    with pytest.raises(ValueError, match=match):
        tf_lora.add_weighted_adapter(model, args.pop("adapters"), args.pop("weights"), args.pop("name"), **args)
    after, names_after = _state(model)
    assert names_after == names and after.keys() == before.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_linear_on_different_targets_or_ranks_says_use_cat():
    for model in (_model(rank_b=3), _model(targets_b=("query",))):
        with pytest.raises(ValueError, match="cat"):
            tf_lora.add_weighted_adapter(model, ["default", "b"], [1.0, 1.0], "m", combination="linear")
        assert "m" not in model.adapter_names
        tf_lora.add_weighted_adapter(model, ["default", "b"], [1.0, 1.0], "m", combination="cat")  # works


def test_matches_peft_add_weighted_adapter_on_the_same_weights():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(5, name="fc1")(inputs)
    base = keras.Model(inputs, keras.layers.Dense(4, name="fc2")(h))
    model = tf_lora.adapt(base, tf_lora.LoRAConfig(rank=2, alpha=4, target_modules=("fc1", "fc2")))
    tf_lora.add_adapter(model, "b", tf_lora.LoRAConfig(rank=2, alpha=6, target_modules=("fc1", "fc2")))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(6, 5), torch.nn.Linear(5, 4)

    net = peft.get_peft_model(Net(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"]))
    net.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["fc1", "fc2"]))
    rng = np.random.default_rng(3)
    for path, layer in model.adapter_layers():
        module = getattr(net.base_model.model, path.split("/")[-1])
        for name in ("default", "b"):
            a, b = layer.adapter_variables(name)
            a.assign(rng.normal(0, 0.5, a.shape).astype("float32"))
            b.assign(rng.normal(0, 0.5, b.shape).astype("float32"))
            module.lora_A[name].weight.data = torch.tensor(np.asarray(a).T.copy())
            module.lora_B[name].weight.data = torch.tensor(np.asarray(b).T.copy())
    for method, density in (("linear", None), ("cat", None), ("ties", 0.5), ("magnitude_prune", 0.5), ("svd", None)):
        name = f"m_{method}"
        kw = {} if density is None else {"density": density}
        net.add_weighted_adapter(["default", "b"], [0.8, 0.3], name, combination_type=method, **kw)
        tf_lora.add_weighted_adapter(model, ["default", "b"], [0.8, 0.3], name, combination=method, **kw)
        for path, layer in model.adapter_layers():
            module = getattr(net.base_model.model, path.split("/")[-1])
            peft_delta = (module.get_delta_weight(name).detach().numpy()).T
            np.testing.assert_allclose(layer.lora_delta(name), peft_delta, atol=1e-5, err_msg=f"{method} {path}")
            if method != "svd":  # SVD factors are defined up to signs; compare the update only
                np.testing.assert_allclose(np.asarray(layer.adapter_variables(name)[0]),
                                           module.lora_A[name].weight.detach().numpy().T, atol=1e-6)


def test_dora_adapters_are_refused_before_anything_changes():
    keras.utils.set_random_seed(0)
    model = tf_lora.adapt(mha_classifier(), tf_lora.LoRAConfig(rank=2, use_dora=True, target_modules=("ffn",)))
    tf_lora.add_adapter(model, "b", tf_lora.LoRAConfig(rank=2, target_modules=("ffn",)))
    with pytest.raises(NotImplementedError, match="DoRA"):
        tf_lora.add_weighted_adapter(model, ["default", "b"], [1.0, 1.0], "m", combination="cat")
    assert model.adapter_names == ["default", "b"]
