"""Smoke runs of the examples with tiny settings: the report's numbers are finite
and the adapted model improved on the target domain."""

import math
import os
import sys
from unittest import mock

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import finetune  # noqa: E402

TINY = ["--pretrain-steps", "20", "--steps", "40", "--batch-size", "8", "--seq-len", "32", "--dim", "32",
        "--layers", "1", "--eval-windows", "32", "--verbose", "0"]


@pytest.mark.parametrize("quant", [False, True], ids=["lora", "qlora"])
def test_finetune_lm_improves_target_domain(quant, tmp_path):
    path = str(tmp_path / "code.adapter")
    argv = TINY + ["--save-adapter", path] + ([] if quant else ["--no-quant"])
    report = finetune.main(argv)
    for key, value in report.items():
        if isinstance(value, float):
            assert math.isfinite(value), key
    assert report["perplexity_after"] < report["perplexity_base"]
    assert report["perplexity_adapted_at_init"] == pytest.approx(report["perplexity_base"], rel=0.05 if quant else 1e-5)
    assert report["merged_max_abs_diff"] < 1e-3
    assert 0 < report["trainable_percent"] < 50
    assert os.path.getsize(path) == report["adapter_bytes"]


def test_corpora_are_offline_and_deterministic():
    prose = finetune.prose_corpus()
    train, held_out = finetune.code_corpus()
    assert len(prose) > 50_000 and len(train) > 200_000 and len(held_out) > 20_000
    assert prose == finetune.prose_corpus()
    assert b"def " in train and b"def " not in prose[:1000]


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--rank", "0"], "--rank"),
        (["--rank", "x"], "--rank"),
        (["--alpha", "-1"], "--alpha"),
        (["--save-adapter", "/no/such/folder/a.adapter"], "--save-adapter"),
        (["--dataset", "no_such_dataset_xyz"], "--dataset"),
    ],
    ids=["rank_zero", "rank_text", "alpha_negative", "adapter_folder_missing", "unknown_dataset"],
)
def test_bad_flags(argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        finetune.parse_args(argv)
    assert info.value.code == 2
    assert flag in capsys.readouterr().err


def test_dataset_not_available_offline_exits_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as info:
        finetune.main(["--dataset", "imdb_reviews"] + TINY)
    assert info.value.code == 2


def test_dataset_classifier_with_mocked_tfds(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=64), mock.patch.object(finetune, "tfds_prepared", return_value=True):
        report = finetune.main(["--dataset", "imdb_reviews", "--no-quant"] + TINY)
    assert 0.0 <= report["accuracy_after"] <= 1.0
    assert 0 < report["trainable_percent"] < 100
