"""Smoke runs of the further examples with tiny settings (numbers finite, adapters
improve their task) and their flag validation."""

import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import adapter_switching  # noqa: E402
import long_sequence  # noqa: E402
import memory_report  # noqa: E402


def _finite_numbers(report):
    """Every number in a (nested) report dict."""
    for key, value in report.items():
        if isinstance(value, dict):
            yield from _finite_numbers(value)
        elif isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
            yield key, float(value)


# ------------------------------------------------------------- adapter_switching ---
SWITCH_TINY = ["--pretrain-steps", "50", "--steps", "200", "--train-size", "1024",
               "--eval-size", "256", "--verbose", "0"]


def test_adapter_switching_two_tasks_one_base(tmp_path):
    report = adapter_switching.main(SWITCH_TINY + ["--save-dir", str(tmp_path)])
    for key, value in _finite_numbers(report):
        assert math.isfinite(value), key
    acc = report["accuracy"]
    # Each adapter beats the base on its own task; the topic task is easy.
    assert acc["sentiment adapter"]["sentiment"] > acc["base"]["sentiment"] + 0.15
    assert acc["topic adapter"]["topic"] > 0.9
    assert acc["topic adapter"]["topic"] > acc["sentiment adapter"]["topic"] + 0.2
    # The merged adapters are evaluated on both tasks (their accuracy is reported, not asserted:
    # tests/test_merging.py checks the merge math).
    assert set(acc) == {"base", "sentiment adapter", "topic adapter", "merged (cat)", "merged (ties, 0.1)"}
    assert all(0.0 <= a <= 1.0 for row in acc.values() for a in row.values())
    # One shared base, untouched; switching back restores the first adapter exactly.
    assert report["base_max_abs_change"] == 0.0
    assert report["switch_back_max_abs_diff"] == 0.0
    assert report["adapter_params"]["sentiment"] == report["adapter_params"]["topic"] > 0
    for task in ("sentiment", "topic"):
        path = tmp_path / f"{task}.adapter"
        assert path.stat().st_size == report["adapter_bytes"][task]
        assert report["adapter_bytes"][task] < report["base_bytes"]
    assert sorted(os.listdir(tmp_path)) == ["sentiment.adapter", "topic.adapter"]


def test_adapter_switching_data_is_deterministic_and_balanced():
    x1, y1 = adapter_switching.make_sentences(400, np.random.default_rng(5))
    x2, y2 = adapter_switching.make_sentences(400, np.random.default_rng(5))
    assert np.array_equal(x1, x2) and all(np.array_equal(y1[t], y2[t]) for t in y1)
    for task in ("sentiment", "topic"):
        assert 0.4 < y1[task].mean() < 0.6
    # The tasks are independent: one label predicts the other at chance level.
    assert 0.4 < np.mean(y1["sentiment"] == y1["topic"]) < 0.6
    assert "not" in " ".join(adapter_switching.decode(t) for t in x1[:50])


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--rank", "0"], "--rank"),
        (["--rank", "two"], "--rank"),
        (["--alpha", "-1"], "--alpha"),
        (["--steps", "0"], "--steps"),
        (["--dim", "30"], "--dim"),
        (["--save-dir", "/no/such/folder"], "--save-dir"),
        (["--verbose", "5"], "--verbose"),
    ],
    ids=["rank_zero", "rank_text", "alpha_negative", "steps_zero", "dim_not_multiple_of_heads",
         "save_dir_missing", "verbose_out_of_range"],
)
def test_adapter_switching_bad_flags(argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        adapter_switching.parse_args(argv)
    assert info.value.code == 2
    assert flag in capsys.readouterr().err


# ----------------------------------------------------------------- memory_report ---
def test_memory_report_fp32_vs_nf4_vs_double_quant(capsys):
    report = memory_report.main(["--layers", "2", "--dim", "64", "--heads", "2", "--vocab", "256", "--seq-len", "16"])
    for key, value in _finite_numbers(report):
        assert math.isfinite(value), key
    assert len(report["layers"]) == 2 * 6  # q, k, v, o, mlp_up, mlp_down per block
    for row in report["layers"]:
        assert row["float32_bytes"] == 4 * row["parameters"]
        assert row["float32_bytes"] > row["nf4_bytes"] > row["nf4_dq_bytes"]
        assert 0 < row["rel_error_nf4_dq"] < 0.2
    # Every kernel here has a multiple of 64 elements: exactly 4 + 32/64 bits without DQ.
    assert report["bits_per_parameter_nf4"] == pytest.approx(4.5)
    assert 4.1 < report["bits_per_parameter_nf4_dq"] < 4.2
    assert report["bits_mismatch_vs_nf4_module"] < 1e-9
    out = capsys.readouterr().out
    assert "NF4+DQ" in out and "block_0_attention/query" in out


@pytest.mark.parametrize(
    "argv,flag",
    [(["--layers", "0"], "--layers"), (["--dim", "x"], "--dim"), (["--heads", "3"], "--heads"),
     (["--group-size", "-64"], "--group-size")],
    ids=["layers_zero", "dim_text", "heads_not_dividing_dim", "group_size_negative"],
)
def test_memory_report_bad_flags(argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        memory_report.parse_args(argv)
    assert info.value.code == 2
    assert flag in capsys.readouterr().err


# ----------------------------------------------------------------- long_sequence ---
def test_long_sequence_chunked_matches_mha_with_less_memory():
    report = long_sequence.main(["--seq-len", "512", "--steps", "3", "--dim", "32", "--heads", "4",
                                 "--layers", "1", "--chunk-size", "128"])
    mha, chunked = report["runs"]["mha"], report["runs"]["chunked"]
    assert chunked["is_chunked"] and not mha["is_chunked"]
    for key, value in _finite_numbers(report):
        assert math.isfinite(value), key
    for run in (mha, chunked):
        assert run["step_count"] == 3 and run["losses"][-1] < run["losses"][0]  # it trains
    assert report["max_loss_diff"] < 1e-4  # same weights, same batches, exact attention
    assert chunked["peak_bytes"] < mha["peak_bytes"]
    assert report["peak_ratio"] > 1.2


@pytest.mark.parametrize(
    "argv,flag",
    [(["--seq-len", "0"], "--seq-len"), (["--chunk-size", "-1"], "--chunk-size"),
     (["--variants", "mha,flash"], "--variants"), (["--variants", ""], "--variants"),
     (["--heads", "5"], "--heads")],
    ids=["seq_len_zero", "chunk_negative", "variant_unknown", "variants_empty", "heads_not_dividing_dim"],
)
def test_long_sequence_bad_flags(argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        long_sequence.parse_args(argv)
    assert info.value.code == 2
    assert flag in capsys.readouterr().err
