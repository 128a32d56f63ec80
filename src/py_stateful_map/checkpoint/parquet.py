"""``Checkpoint.to_parquet``: finished results as a Parquet file, streamed in row groups.

pyarrow is optional (the ``parquet`` extra) and imported only here.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from itertools import islice
from typing import Any


def write_parquet(results: Iterator[tuple[Any, Any]], path: str, rows_per_group: int) -> int:
    try:  # imported by name: pyarrow is optional and ships no type stubs
        pa: Any = importlib.import_module("pyarrow")
        pq: Any = importlib.import_module("pyarrow.parquet")
    except ImportError as exc:
        raise ImportError(
            "Checkpoint.to_parquet needs pyarrow: pip install 'py_stateful_map[parquet]'"
        ) from exc
    writer = None
    written = 0
    try:
        while batch := list(islice(results, rows_per_group)):
            keys, values = zip(*batch, strict=True)
            table = _table(pa, list(keys), list(values))
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
            written += len(batch)
        if writer is None:  # nothing finished yet: an empty file with the two columns
            pq.write_table(pa.table({"key": pa.array([], pa.int64()), "value": []}), path)
    finally:
        if writer is not None:
            writer.close()
        close = getattr(results, "close", None)
        if close is not None:
            close()
    return written


def _table(pa: Any, keys: list[Any], values: list[Any]) -> Any:
    """Equal-shaped arrays become one fixed-size list column (their shape in its metadata)."""
    key_column = pa.array(keys)
    arrays = _as_arrays(values)
    if arrays is None:
        return pa.table({"key": key_column, "value": pa.array(values)})
    numpy = sys.modules["numpy"]
    flat = numpy.stack(arrays).reshape(len(arrays), -1)
    column = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    shape = json.dumps(list(arrays[0].shape)).encode()
    schema = pa.schema(
        [
            pa.field("key", key_column.type),
            pa.field("value", column.type, metadata={b"shape": shape}),
        ]
    )
    return pa.Table.from_arrays([key_column, column], schema=schema)


def _as_arrays(values: list[Any]) -> list[Any] | None:
    """The values as numpy arrays if all are arrays (or tensors) of one shape and dtype."""
    numpy = sys.modules.get("numpy")
    if numpy is None:
        return None
    torch = sys.modules.get("torch")
    arrays = []
    for value in values:
        array = value
        if torch is not None and isinstance(value, torch.Tensor):
            try:
                array = value.detach().cpu().numpy()
            except TypeError:  # a dtype numpy lacks (bfloat16): let pyarrow try the values
                return None
        if not isinstance(array, numpy.ndarray):
            return None
        arrays.append(array)
    first = arrays[0]
    if any(a.shape != first.shape or a.dtype != first.dtype for a in arrays):
        return None
    return arrays
