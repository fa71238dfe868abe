"""Context features for datasets without morphometrics: a user's CSV table keyed by image id.

Format (our choice): a header row, then one row per image; the first column is the image id (as in
``Dataset.ids``), every other column a number (e.g. CUB's attribute certainties). Rows may come in any
order and may hold images that are not asked for.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fgvce_jax.errors import FgvceError


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def load_context_table(path: str | os.PathLike, ids: Sequence[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """(len(ids), F) float64 context features in ``ids`` order, and the F column names.

    Raises FgvceError in one line when the file is missing or empty, a column other than the first is not
    numeric (naming it and its first bad row), an id repeats, or an id of ``ids`` has no row (naming how
    many and the first few).
    """
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise FgvceError(f"context table {path} does not exist")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2 or len(rows[0]) < 2:
        raise FgvceError(f"context table {path} needs a header, an id column and at least one feature column")
    header, body = rows[0], rows[1:]
    names = tuple(h.strip() for h in header[1:])
    table: dict[str, np.ndarray] = {}
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise FgvceError(f"context table {path}, line {line}: {len(row)} fields, the header has {len(header)}")
        values = [_number(v) for v in row[1:]]
        bad = next((k for k, v in enumerate(values) if v is None), None)
        if bad is not None:
            raise FgvceError(f"context table {path}: column {names[bad]!r} is not numeric "
                             f"(line {line} has {row[bad + 1]!r})")
        key = row[0].strip()
        if key in table:
            raise FgvceError(f"context table {path}: image id {key!r} appears twice")
        table[key] = np.asarray(values, np.float64)
    missing = [i for i in ids if i not in table]
    if missing:
        raise FgvceError(f"context table {path} has no row for {len(missing)} of {len(ids)} images "
                         f"(e.g. {', '.join(missing[:3])})")
    return np.stack([table[i] for i in ids]) if len(ids) else np.zeros((0, len(names))), names
