"""Padding fractions of `tf_lora.data` rows on a real variable-length corpus.

The corpus: the source (docstring included) of every module-level function and class, and
every module docstring, in the Python standard library that runs this script (`ast` over its
``*.py`` files, tests and ``idlelib`` left out), tokenized with a 16k-token byte-level
BPE trained on that corpus (Hugging Face ``tokenizers``). For each `sequence_length` it
prints the share of padding positions:

- fixed: one example per row, padded to `sequence_length` (KerasHub's
  `CausalLMPreprocessor`), over-long examples truncated at the end;
- longest: one example per row, each batch (random order) cut to its longest row;
- packed: `tf_lora.data` first-fit-decreasing packing, truncation ``"end"`` and ``"split"``.

Usage: ``python benchmarks/data_padding.py [--quick] [--lengths 512 1024] [--batch-size 8]``.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import sysconfig

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def stdlib_corpus(limit: int = 0) -> list:
    """``[{"text": ...}]``: module docstrings and module-level function and class sources of the stdlib."""
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("test", "tests", "idlelib", "site-packages", "__pycache__")
                         and not d.startswith(("lib2to3", "turtledemo")))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    source = f.read()
                tree = ast.parse(source)
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            doc = ast.get_docstring(tree)
            if doc:
                docs.append({"text": doc})
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    segment = ast.get_source_segment(source, node)
                    if segment:
                        docs.append({"text": segment})
            if limit and len(docs) >= limit:
                return docs[:limit]
    return docs


def bpe_tokenizer(docs: list, vocab_size: int = 16384):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator((d["text"] for d in docs), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return lambda text: bpe.encode(text).ids


def longest_padding(mask: np.ndarray, batch_size: int, seed: int = 0) -> float:
    """Padding share when each batch (random order) is cut to its longest row."""
    lengths = mask.sum(1)[np.random.default_rng(seed).permutation(len(mask))]
    total = sum(int(lengths[i:i + batch_size].max()) * len(lengths[i:i + batch_size])
                for i in range(0, len(lengths), batch_size))
    return 1.0 - lengths.sum() / total


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="400 documents, a 2k vocabulary")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    from tf_lora import data

    docs = stdlib_corpus(400 if args.quick else 0)
    tokenize = bpe_tokenizer(docs, 2048 if args.quick else 16384)
    lengths = np.array([len(tokenize(d["text"])) + 1 for d in docs])  # + the end token
    print(f"corpus: {len(docs):,d} documents from {sysconfig.get_paths()['stdlib']} (Python "
          f"{sys.version.split()[0]}), tokens per document: median {int(np.median(lengths))}, "
          f"p90 {int(np.percentile(lengths, 90))}, p99 {int(np.percentile(lengths, 99))}, total {lengths.sum():,d}")
    results = {}
    print(f"{'sequence_length':>15} | {'fixed':>8} | {'longest (b=' + str(args.batch_size) + ')':>15} | "
          f"{'packed':>8} | {'packed, split':>13} | {'rows fixed/packed':>17} | ratio fixed/packed rows")
    print("-" * 110)
    for n in args.lengths:
        fixed = data.prepare(docs, tokenize, n, eos_id=0, verbose=0)
        packed = data.prepare(docs, tokenize, n, packing=True, eos_id=0, verbose=0)
        split = data.prepare(docs, tokenize, n, packing=True, truncation="split", eos_id=0, verbose=0)
        longest = longest_padding(fixed.rows["padding_mask"], args.batch_size)
        results[n] = dict(fixed=fixed.stats, packed=packed.stats, split=split.stats, longest=longest)
        print(f"{n:>15,d} | {fixed.stats.padding_fraction:>8.2%} | {longest:>15.2%} | "
              f"{packed.stats.padding_fraction:>8.2%} | {split.stats.padding_fraction:>13.2%} | "
              f"{fixed.stats.rows:>8,d}/{packed.stats.rows:<8,d} | {fixed.stats.rows / packed.stats.rows:.2f}x")
        print(f"{'':>15}   truncated at {n}: {fixed.stats.truncated:,d} documents, "
              f"{fixed.stats.truncated_tokens:,d} tokens cut; split keeps all {split.stats.label_tokens:,d} labels "
              f"in {split.stats.rows:,d} rows")
    return results


if __name__ == "__main__":
    main()
