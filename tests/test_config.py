"""LoRAConfig / QLoRAConfig validation and serialization."""

import dataclasses

import pytest

from tf_lora import LoRAConfig, QLoRAConfig
from tf_lora.config import matches


def test_defaults_follow_the_notebook_design():
    cfg = LoRAConfig()
    assert (cfg.rank, cfg.alpha, cfg.dropout) == (8, 32, 0.1)
    assert cfg.target_modules == ("query", "key", "value")
    assert cfg.init == "he_uniform" and cfg.quantization is None


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LoRAConfig().rank = 4


def test_scaling_and_patterns():
    cfg = LoRAConfig(rank=4, alpha=8, rank_pattern={"value": 2, r".*/query": 16}, alpha_pattern={"value": 1})
    assert cfg.scaling_for(4, 8) == 2.0
    assert LoRAConfig(use_rslora=True).scaling_for(4, 8) == 4.0
    assert cfg.rank_for("value", "mha/value") == 2
    assert cfg.rank_for("query", "mha/query") == 16
    assert cfg.rank_for("key", "mha/key") == 4
    assert cfg.alpha_for("value", "mha/value") == 1.0
    assert cfg.alpha_for("key", "mha/key") == 8.0


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_rank_pattern_most_specific_match_wins(field):
    def value_for(patterns, name, path):
        cfg = LoRAConfig(rank=8, alpha=8, **{field: patterns})
        return (cfg.rank_for if field == "rank_pattern" else cfg.alpha_for)(name, path)

    # An exact own name beats a key merely contained in it, whatever the order.
    assert value_for({"query": 3, "query_norm": 5}, "query_norm", "enc/query_norm") == 5
    assert value_for({"query_norm": 5, "query": 3}, "query_norm", "enc/query_norm") == 5
    assert value_for({"query": 3, "query_norm": 5}, "query", "enc/query") == 3
    # An exact full path beats an exact name elsewhere and a regex.
    assert value_for({r"enc/.*": 2, "query": 3, "dec/query": 4}, "query", "dec/query") == 4
    # An exact name beats a regex on the path.
    assert value_for({r"enc/.*": 2, "query": 3}, "query", "enc/query") == 3
    # A full regex match on the path beats a contained name.
    assert value_for({"query": 3, r".*/query_proj": 6}, "query_proj", "enc/query_proj") == 6
    # Among contained names, the longest wins.
    assert value_for({"q": 2, "query_n": 4, "query": 3}, "query_norm_1", "enc/query_norm_1") == 4
    # No key applies: the config's own value.
    assert value_for({"query": 3}, "key", "enc/key") == 8


def test_matching_rules():
    assert matches(("query",), "query_proj", "block/query_proj")  # contained in the name
    assert not matches(("query",), "q", "query/q")  # not the path
    assert matches(r"block_\d+/.*query", "query", "block_0/attn/query")  # regex on the full path
    assert not matches(r"query", "query", "block_0/query")  # full match only
    assert matches("all-linear", "anything", "x/y")


def test_round_trip_dict():
    cfg = LoRAConfig(rank=4, modules_to_save=("head",), rank_pattern={"v": 2}, quantization=QLoRAConfig(group_size=32))
    again = LoRAConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.quantization.group_size == 32


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"rank": 0}, ValueError, "rank"),
        ({"rank": -2}, ValueError, "rank"),
        ({"rank": 2.0}, TypeError, "rank"),
        ({"rank": True}, TypeError, "rank"),
        ({"alpha": 0}, ValueError, "alpha"),
        ({"alpha": -1.0}, ValueError, "alpha"),
        ({"alpha": "8"}, TypeError, "alpha"),
        ({"dropout": 1.0}, ValueError, "dropout"),
        ({"dropout": -0.1}, ValueError, "dropout"),
        ({"init": "xavier"}, ValueError, "init"),
        ({"target_modules": ()}, ValueError, "target_modules"),
        ({"target_modules": 3}, TypeError, "target_modules"),
        ({"target_modules": "("}, ValueError, "target_modules"),
        ({"exclude_modules": "all-linear"}, ValueError, "exclude_modules"),
        ({"rank_pattern": {"q": 0}}, ValueError, "rank_pattern"),
        ({"alpha_pattern": {"q(": 2}}, ValueError, "alpha_pattern"),
        ({"quantization": {"bits": 4}}, TypeError, "quantization"),
        ({"attention": "flash"}, ValueError, "attention"),
        ({"max_attention_memory": 1024}, ValueError, "max_attention_memory"),
    ],
    ids=["rank_zero", "rank_negative", "rank_float", "rank_bool", "alpha_zero", "alpha_negative",
         "alpha_str", "dropout_one", "dropout_negative", "unknown_init", "empty_targets",
         "targets_int", "bad_regex", "exclude_all_linear", "rank_pattern_zero", "pattern_bad_regex", "quant_dict",
         "unknown_attention", "memory_without_chunked"],
)
def test_bad_lora_config(kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        LoRAConfig(**kwargs)
    assert "Received" in str(info.value)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"bits": 8}, NotImplementedError, "bits"),
        ({"quant_type": "fp4"}, ValueError, "quant_type"),
        ({"group_size": 0}, ValueError, "group_size"),
        ({"group_size": 64.0}, TypeError, "group_size"),
        ({"compute_dtype": "int8"}, ValueError, "compute_dtype"),
    ],
    ids=["bits_8", "fp4", "group_zero", "group_float", "compute_int8"],
)
def test_bad_qlora_config(kwargs, error, match):
    with pytest.raises(error, match=match):
        QLoRAConfig(**kwargs)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="data"):
        LoRAConfig.from_dict({"rank": 4, "lora_rank": 8})
