"""Fitting tokenized examples into rows of `sequence_length` positions.

An example of ``L`` tokens takes ``L - 1`` positions, as in KerasHub's
`CausalLMPreprocessor`: inputs ``ids[:-1]``, labels ``ids[1:]``, sample weights
``trained[1:]``. A row therefore never holds a label from another example: the last
token of an example is a label only, never an input that predicts the next example.

Over-long examples (``L - 1 > sequence_length``) follow `truncation`:

- ``"end"`` (default): keep the first ``sequence_length + 1`` tokens; counted in
  `truncated` and `truncated_tokens`.
- ``"split"``: cut into consecutive windows of ``sequence_length + 1`` tokens that overlap
  by one token, so every token after the first is a label exactly once; counted in `split`.
- ``"drop"``: leave the example out; counted in `dropped`.
- ``"error"``: raise a `ValueError` naming the example.

A piece with no trained label left (for instance a prompt as long as `sequence_length`,
so its completion was cut away, or a window of a split prompt) is left out and counted
in `skipped_no_target`; an example of fewer than 2 tokens in `skipped_empty`.

Packing places pieces by first-fit decreasing: longest first (ties in input order),
each into the first row with room, rows numbered as they open; inside a row, pieces in
the order placed. Rows carry ``segment_ids`` (0 = padding, 1..k = the piece within the
row) and ``positions`` (0, 1, ... restarting for each piece).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence, Tuple

import numpy as np

TRUNCATION = ("end", "split", "drop", "error")


@dataclasses.dataclass
class Counts:
    truncated: int = 0
    truncated_tokens: int = 0
    split: int = 0
    dropped: int = 0
    skipped_no_target: int = 0
    skipped_empty: int = 0


def fit_length(examples: Sequence[Tuple[np.ndarray, np.ndarray]], where: Sequence[str], sequence_length: int,
               truncation: str) -> Tuple[List[Tuple[int, np.ndarray, np.ndarray]], Counts]:
    """``([(example index, ids, trained)], counts)``: pieces of at most
    ``sequence_length + 1`` tokens with at least one trained label."""
    counts, pieces, cap = Counts(), [], sequence_length + 1
    for index, (ids, trained) in enumerate(examples):
        if len(ids) < 2:
            counts.skipped_empty += 1
            continue
        if len(ids) > cap:
            if truncation == "error":
                raise ValueError(f"Received an invalid value for `source`: {where[index]} has {len(ids)} tokens, more "
                                 f"than sequence_length + 1 = {cap}. Pass a larger `sequence_length`, or "
                                 "truncation='end', 'split' or 'drop'.")
            if truncation == "drop":
                counts.dropped += 1
                continue
            if truncation == "end":
                counts.truncated += 1
                counts.truncated_tokens += len(ids) - cap
                windows = [(ids[:cap], trained[:cap])]
            else:
                counts.split += 1
                windows = [(ids[k:k + cap], trained[k:k + cap]) for k in range(0, len(ids) - 1, sequence_length)]
        else:
            windows = [(ids, trained)]
        for piece_ids, piece_trained in windows:
            if not piece_trained[1:].any():
                counts.skipped_no_target += 1
                continue
            pieces.append((index, piece_ids, piece_trained))
    return pieces, counts


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> Tuple[np.ndarray, int]:
    """``(row of each item, number of rows)``: first-fit decreasing bin packing.

    Items go longest first (ties in input order), each into the lowest-numbered row whose
    free room is at least its length. A max-tree over the rows' free room finds that row
    in O(log n), so n items pack in O(n log n).
    """
    n = len(lengths)
    size = 1
    while size < max(n, 1):
        size *= 2
    free = np.full(2 * size, capacity, np.int64)  # free[node] = max free room below node
    rows = np.zeros(n, np.int64)
    used = 0
    for item in sorted(range(n), key=lambda i: (-lengths[i], i)):
        length, node = lengths[item], 1
        while node < size:
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        row = node - size
        rows[item], used = row, max(used, row + 1)
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows, used


def build_rows(pieces: Sequence[Tuple[int, np.ndarray, np.ndarray]], sequence_length: int, packed: bool,
               pad_id: int) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """``(rows, placements)``: the row arrays (``token_ids``, ``padding_mask``,
    ``segment_ids``, ``positions``, ``labels``, ``sample_weight``) and, per piece,
    ``(row, start, segment id)``."""
    lengths = [len(ids) - 1 for _, ids, _ in pieces]
    if packed:
        row_of, n_rows = first_fit_decreasing(lengths, sequence_length)
        order = sorted(range(len(pieces)), key=lambda i: (-lengths[i], i))  # placement order
    else:
        row_of, n_rows = np.arange(len(pieces)), len(pieces)
        order = list(range(len(pieces)))
    shape = (n_rows, sequence_length)
    rows = {
        "token_ids": np.full(shape, pad_id, np.int32),
        "segment_ids": np.zeros(shape, np.int32),
        "positions": np.zeros(shape, np.int32),
        "labels": np.full(shape, pad_id, np.int32),
        "sample_weight": np.zeros(shape, np.float32),
    }
    fill = np.zeros(n_rows, np.int64)
    segment = np.zeros(n_rows, np.int32)
    placements = np.zeros((len(pieces), 3), np.int64)
    for i in order:
        _, ids, trained = pieces[i]
        row, start, length = row_of[i], fill[row_of[i]], lengths[i]
        segment[row] += 1
        span = slice(start, start + length)
        rows["token_ids"][row, span] = ids[:-1]
        rows["labels"][row, span] = ids[1:]
        rows["sample_weight"][row, span] = trained[1:]
        rows["segment_ids"][row, span] = segment[row]
        rows["positions"][row, span] = np.arange(length)
        placements[i] = (row, start, segment[row])
        fill[row] += length
    rows["padding_mask"] = (rows["segment_ids"] > 0).astype(np.int32)
    return rows, placements
