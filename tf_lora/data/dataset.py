"""`prepare`: examples -> tokenized rows -> a `tf.data.Dataset` for a KerasHub CausalLM.

The dataset yields ``(x, y, sample_weight)`` as KerasHub's `CausalLMPreprocessor` does,
so `fit` and `evaluate` of a CausalLM built with ``preprocessor=None`` (or any adapted
one) take it directly: ``x = {"token_ids", "padding_mask"}`` (int32, ``(batch,
sequence_length)``), ``y`` the next tokens (int32), ``sample_weight`` float32, 1 on the
labels that train and 0 on prompt, system, user and padding positions. Packed rows add
``x["segment_ids"]`` and ``x["positions"]`` (see `tf_lora.data.packing`). KerasHub decoders
adapted by `tf_lora.adapt` (GPT-2, Llama, Llama 3, Mistral, Qwen, Gemma, Gemma 2), or
switched with `tf_lora.enable_packing`, read them: each example attends only to earlier
tokens of its own and sees positions restarting at 0, so it trains exactly as it would
unpacked. An adapted model that cannot read them raises; a KerasHub model that is neither
adapted nor switched would drop them (with a Keras warning) and let the examples of a row
attend to each other.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from tf_lora.data import formats
from tf_lora.data.packing import TRUNCATION, build_rows, fit_length
from tf_lora.data.chat_template import ChatTemplate, template_of
from tf_lora.data.tokenize import TokenizerAdapter

logger = logging.getLogger("tf_lora.data")


@dataclasses.dataclass(frozen=True)
class DataStats:
    """What `prepare` made of the examples; nothing is left out without a count here.

    Attributes:
        format: ``"text"``, ``"prompt/completion"`` or ``"chat"``.
        examples: Examples read.
        pieces: Pieces placed in rows (one per example, more with ``truncation="split"``).
        rows: Rows of `sequence_length` positions.
        sequence_length: Positions per row.
        packed: Whether several pieces share a row.
        label_tokens: Positions holding a label (not padding).
        trained_tokens: Labels with sample weight 1.
        truncated, truncated_tokens: Examples cut at the end, and tokens cut off.
        split: Examples cut into several windows.
        dropped: Over-long examples left out (``truncation="drop"``).
        skipped_no_target: Pieces left out because no trained label was left in them.
        skipped_empty: Examples of fewer than 2 tokens (nothing to predict).
        padding_fraction: Padding positions / all positions.
    """

    format: str
    examples: int
    pieces: int
    rows: int
    sequence_length: int
    packed: bool
    label_tokens: int
    trained_tokens: int
    truncated: int
    truncated_tokens: int
    split: int
    dropped: int
    skipped_no_target: int
    skipped_empty: int
    padding_fraction: float

    def summary(self) -> str:
        parts = [f"{self.examples:,d} {self.format} examples -> {self.rows:,d} rows of {self.sequence_length:,d} "
                 f"tokens ({'packed' if self.packed else 'one example per row'}), {self.trained_tokens:,d} of "
                 f"{self.label_tokens:,d} labels trained, padding {100 * self.padding_fraction:.2f}%"]
        for name, value in (("truncated", self.truncated), ("split", self.split), ("dropped", self.dropped),
                            ("skipped: no trained token left", self.skipped_no_target),
                            ("skipped: empty", self.skipped_empty)):
            if value:
                extra = f" ({self.truncated_tokens:,d} tokens cut)" if name == "truncated" else ""
                parts.append(f"{name}: {value:,d}{extra}")
        return "; ".join(parts)


class CausalLMData:
    """Tokenized examples in rows; `dataset` makes the `tf.data.Dataset`.

    Attributes:
        rows: ``{"token_ids", "padding_mask", "segment_ids", "positions", "labels",
            "sample_weight"}``, NumPy arrays of shape ``(rows, sequence_length)``.
        pieces: ``[(example index, ids, trained)]``: what was placed, in input order.
        placements: ``(pieces, 3)`` array: each piece's ``(row, start, segment id)``.
        stats: The `DataStats`.
    """

    def __init__(self, rows, pieces, placements, stats: DataStats):
        self.rows, self.pieces, self.placements, self.stats = rows, pieces, placements, stats

    @property
    def sequence_length(self) -> int:
        return self.stats.sequence_length

    @property
    def packed(self) -> bool:
        return self.stats.packed

    def steps(self, batch_size: int, drop_remainder: bool = False) -> int:
        """Batches per epoch."""
        n = self.stats.rows
        return n // batch_size if drop_remainder else -(-n // batch_size)

    def dataset(self, batch_size: int, shuffle: bool = True, seed: int = 0, drop_remainder: bool = False,
                padding: str = "max_length"):
        """A `tf.data.Dataset` of ``(x, y, sample_weight)`` batches, one epoch per iteration.

        Args:
            batch_size: Rows per batch.
            shuffle: Shuffle the rows each epoch. The order of epoch ``e`` is a function
                of ``(seed, e)`` alone (a stateless permutation), so it is the same in
                every process: the k-th iteration of the dataset is epoch k, and
                ``dataset.set_epoch(e)`` makes the next one epoch ``e``
                (`tf_lora.AdapterCheckpoint(data=dataset)` does this at each epoch, so a
                resumed `fit` sees the order an uninterrupted one would).
            seed: The shuffling seed.
            drop_remainder: Leave out a last, smaller batch (its rows are not trained
                that epoch); by default it is kept.
            padding: ``"max_length"``: every batch is `sequence_length` wide (fixed
                shapes, as KerasHub's preprocessor pads). ``"longest"``: each batch is cut
                to its longest row.

        Returns:
            The dataset, with attributes `stats` (the `DataStats`), `steps` (batches per
            epoch) and `set_epoch`. Transformations (``.repeat()``...) return datasets
            without them.
        """
        import tensorflow as tf

        _positive_int("batch_size", batch_size)
        for name, value in (("shuffle", shuffle), ("drop_remainder", drop_remainder)):
            if not isinstance(value, bool):
                raise TypeError(f"Received an invalid value for `{name}`, expected a bool. Received: {name}={value!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"Received an invalid value for `seed`, expected an int. Received: seed={seed!r}")
        if padding not in ("max_length", "longest"):
            raise ValueError("Received an invalid value for `padding`, expected 'max_length' or 'longest'. "
                             f"Received: padding={padding!r}")
        steps = self.steps(batch_size, drop_remainder)
        if steps == 0:
            raise ValueError(f"Received an invalid value for `batch_size`: {batch_size} rows per batch with "
                             f"drop_remainder=True leaves no batch of the {self.stats.rows} rows.")
        keys = ["token_ids", "padding_mask"] + (["segment_ids", "positions"] if self.packed else [])
        tensors = {k: tf.constant(v) for k, v in self.rows.items() if k in keys + ["labels", "sample_weight"]}
        n = self.stats.rows
        with tf.init_scope():
            epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="tf_lora_data_epoch")

        def gather(index):
            batch = {k: tf.gather(t, index) for k, t in tensors.items()}
            if padding == "longest":
                width = tf.reduce_max(tf.reduce_sum(batch["padding_mask"], axis=1))
                batch = {k: t[:, :width] for k, t in batch.items()}
            return {k: batch[k] for k in keys}, batch["labels"], batch["sample_weight"]

        def one_epoch(_):
            e = epoch.assign_add(1) - 1
            if shuffle:
                noise = tf.random.stateless_uniform([n], seed=tf.stack([tf.constant(seed, tf.int64), e]))
                order = tf.argsort(noise, stable=True)
            else:
                order = tf.range(n)
            return tf.data.Dataset.from_tensor_slices(order).batch(batch_size, drop_remainder).map(gather)

        ds = tf.data.Dataset.from_tensors(tf.constant(0)).flat_map(one_epoch)
        ds = ds.apply(tf.data.experimental.assert_cardinality(steps)).prefetch(2)
        ds.stats = self.stats
        ds.steps = steps
        ds.set_epoch = lambda e: epoch.assign(int(e))
        ds._tf_lora_epoch = epoch
        return ds


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"Received an invalid value for `{name}`, expected a positive integer. Received: {name}={value!r}")
    return int(value)


def prepare(source: Union[str, Sequence[dict]], tokenizer, sequence_length: int, packing: bool = False,
            completion_only: bool = True, truncation: str = "end", chat_template: Optional[str] = None,
            chat_template_variables: Optional[Mapping] = None, train_roles: Sequence[str] = ("assistant",),
            add_special_tokens: bool = True, special_tokens=None, bos_id: Optional[int] = None,
            eos_id: Optional[int] = None, pad_id: Optional[int] = None, verbose: int = 1) -> CausalLMData:
    """Reads, tokenizes, masks and lays out examples for CausalLM fine-tuning.

    Args:
        source: A JSONL file path or a list of dicts, in one format chosen by the first
            example's keys: ``{"text"}``, ``{"prompt", "completion"}`` or ``{"messages"}``
            (see `tf_lora.data.formats`). Blank lines are skipped.
        tokenizer: A KerasHub tokenizer, a CausalLM or preprocessor carrying one, or a
            callable ``str -> ids`` (see `TokenizerAdapter`).
        sequence_length: Model input positions per row; an example of ``L`` tokens
            takes ``L - 1`` (inputs ``ids[:-1]``, labels ``ids[1:]``).
        packing: Put several examples in each row (first-fit decreasing), with
            ``segment_ids`` and ``positions``; otherwise one example per row, padded.
        completion_only: Train only on completions / assistant turns (sample weight 0 on
            prompt, system and user tokens). False: every token. Plain text trains
            every token either way.
        truncation: ``"end"``, ``"split"``, ``"drop"`` or ``"error"`` for examples longer
            than ``sequence_length + 1`` tokens (see `tf_lora.data.packing`).
        chat_template: For ``{"messages"}`` data: the Jinja template; default, the one
            the tokenizer carries (``tokenizer.chat_template``), if any.
        chat_template_variables: Further template variables (``bos_token`` and
            ``eos_token`` default to the tokenizer's strings).
        train_roles: Roles whose turns are trained in chat data.
        add_special_tokens: Add the start token before and the end token (trained)
            after text and prompt/completion examples; chat templates write their own.
        special_tokens, bos_id, eos_id, pad_id: See `TokenizerAdapter`.
        verbose: 1: print a progress bar while tokenizing (large inputs) and a one-line
            summary with every count; 0: silent (the summary still goes to the
            ``tf_lora.data`` logger).

    Returns:
        A `CausalLMData`: ``.dataset(batch_size)`` gives the `tf.data.Dataset`, ``.stats``
        the counts.

    Raises:
        ValueError: bad arguments; a malformed JSONL line or a missing key (its line is
            named); an empty file; nothing left to train once over-long examples and
            examples without a trained label are counted out.

    Example:
        >>> data = tf_lora.data.prepare("train.jsonl", causal_lm, sequence_length=512)  # doctest: +SKIP
        >>> causal_lm.fit(data.dataset(batch_size=8), epochs=1)                          # doctest: +SKIP
    """
    _positive_int("sequence_length", sequence_length)
    for name, value in (("packing", packing), ("completion_only", completion_only),
                        ("add_special_tokens", add_special_tokens)):
        if not isinstance(value, bool):
            raise TypeError(f"Received an invalid value for `{name}`, expected a bool. Received: {name}={value!r}")
    if truncation not in TRUNCATION:
        raise ValueError(f"Received an invalid value for `truncation`, expected one of {TRUNCATION}. "
                         f"Received: truncation={truncation!r}")
    if isinstance(train_roles, str) or not all(isinstance(r, str) for r in train_roles):
        raise TypeError(f"Received an invalid value for `train_roles`, expected a sequence of role names. "
                        f"Received: train_roles={train_roles!r}")
    adapter = TokenizerAdapter(tokenizer, special_tokens, bos_id, eos_id, pad_id)
    records, where = formats.read_examples(source)
    fmt_class = formats.format_for(records[0], where[0])
    if fmt_class is formats.ChatFormat:
        text = chat_template if chat_template is not None else template_of(adapter.tokenizer)
        variables = {"bos_token": adapter.bos_token, "eos_token": adapter.eos_token, **(chat_template_variables or {})}
        fmt = formats.ChatFormat(completion_only, ChatTemplate(text, **variables) if text is not None else None,
                                 train_roles)
    else:
        fmt = fmt_class(completion_only)
    examples = _encode(fmt, records, where, adapter, add_special_tokens, verbose)
    pieces, counts = fit_length(examples, where, sequence_length, truncation)
    if not pieces:
        raise ValueError(f"Received an invalid value for `source`: no example has a trained token left at "
                         f"sequence_length={sequence_length} (truncation={truncation!r}: {dataclasses.asdict(counts)}). "
                         "Pass a larger `sequence_length`.")
    rows, placements = build_rows(pieces, sequence_length, packing, adapter.pad_id)
    mask = rows["padding_mask"]
    stats = DataStats(format=fmt.name, examples=len(records), pieces=len(pieces), rows=len(mask),
                      sequence_length=sequence_length, packed=packing, label_tokens=int(mask.sum()),
                      trained_tokens=int((rows["sample_weight"] > 0).sum()),
                      padding_fraction=float(1.0 - mask.mean()), **dataclasses.asdict(counts))
    logger.info(stats.summary())
    if verbose:
        print(f"tf_lora.data: {stats.summary()}")
    return CausalLMData(rows, pieces, placements, stats)


def _encode(fmt, records: List[dict], where: List[str], adapter: TokenizerAdapter, add_special_tokens: bool,
            verbose: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    chunk = 4096
    bar = None
    if verbose and len(records) > chunk:
        import keras

        bar = keras.utils.Progbar(len(records), unit_name="example")
    out: List[Tuple[np.ndarray, np.ndarray]] = []
    bos = adapter.bos_id if add_special_tokens and fmt.adds_special_tokens else None
    eos = adapter.eos_id if add_special_tokens and fmt.adds_special_tokens else None
    for begin in range(0, len(records), chunk):
        segments = [fmt.segments(r, w) for r, w in zip(records[begin:begin + chunk], where[begin:begin + chunk])]
        for ids, trained in adapter.encode_segments(segments):
            if bos is not None:
                ids, trained = np.concatenate([[bos], ids]).astype(np.int32), np.concatenate([[False], trained])
            if eos is not None:
                ids, trained = np.concatenate([ids, [eos]]).astype(np.int32), np.concatenate([trained, [True]])
            out.append((ids, trained))
        if bar is not None:
            bar.update(min(begin + chunk, len(records)))
    return out


def causal_lm_dataset(source, tokenizer, sequence_length: int, batch_size: int, packing: bool = False,
                      shuffle: bool = True, seed: int = 0, **kwargs):
    """``prepare(source, tokenizer, sequence_length, packing, **kwargs).dataset(batch_size,
    shuffle, seed)``: the `tf.data.Dataset` in one call (its ``.stats`` holds the counts).

    Example:
        >>> ds = tf_lora.data.causal_lm_dataset("train.jsonl", lm, 512, batch_size=8)  # doctest: +SKIP
        >>> lm.fit(ds, epochs=1)                                                        # doctest: +SKIP
    """
    return prepare(source, tokenizer, sequence_length, packing=packing, **kwargs).dataset(
        batch_size, shuffle=shuffle, seed=seed)
