"""Parquet files of the engine: pyarrow imported on first use, tables written atomically, result records as a table.

Used by the embeddings folder (`metadata/part-NNNNN.parquet`) and by `imat search --out x.parquet`.
pyarrow is in the engine extra; it is imported lazily so that serving and `imat --help` never load it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from imat.errors import ConfigError
from imat.fileio import atomic_path

logger = logging.getLogger(__name__)

PARQUET_SUFFIX = ".parquet"


def pyarrow_modules():
    """(pyarrow, pyarrow.parquet); ConfigError saying what to install when pyarrow is missing."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ModuleNotFoundError:
        raise ConfigError(
            "parquet files need the Python package 'pyarrow', which is not installed; "
            "pip install 'imat[engine]' (or pip install pyarrow)"
        ) from None
    return pyarrow, pyarrow.parquet


def write_table(table, path) -> None:
    """Write a pyarrow Table as parquet: temp file beside `path`, fsync, rename."""
    _, pq = pyarrow_modules()
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp))


def records_table(records: Sequence[Mapping[str, Any]]):
    """A pyarrow Table of JSON-like records: one row a record, one column per key found in any record.

    A key a record lacks is null in its row, so every field of the JSON Lines records is kept; nested
    lists of objects (search results, predicted categories) become list<struct> columns.
    """
    pa, _ = pyarrow_modules()
    keys: dict[str, None] = {}
    for record in records:
        keys.update(dict.fromkeys(record))
    return pa.Table.from_pydict({key: [record.get(key) for record in records] for key in keys})


def write_records_parquet(records: Sequence[Mapping[str, Any]], path) -> None:
    """Write result records (imat.engine.search) as a parquet file, atomically."""
    write_table(records_table(records), path)
    logger.info("wrote %d records to %s", len(records), path)
