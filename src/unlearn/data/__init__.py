"""The data layer: TOFU-format splits from a synthetic generator, local files or the hub, in one validated schema.

Typical use (the ``data`` stage)::

    from unlearn.data import load_from_config, write_splits, read_split
    write_splits(load_from_config(params.data), params.data.out_dir)
    forget = read_split(params.data.out_dir, params.data.forget_split)

Split names and their pairing rules live in :mod:`unlearn.data.names`; a split
directory (benchmark or built from deletion requests) has one format, written by
:func:`write_splits` and read by :func:`read_split_dir` (see :mod:`unlearn.data.splits`).
"""

from .loaders import TOFU_QA_PER_AUTHOR, load_from_config, load_hub, load_local, load_tofu, read_records
from .names import IDK, PERTURBED_SPLITS, QA_SPLITS, SPLIT_NAMES, UTILITY_SPLITS, perturbed_of, retain_of
from .schema import ROW_KEYS, DataError, check_disjoint, split_kind, validate_rows, validate_split_set, validate_splits
from .splits import (
    MANIFEST,
    forget_set_hash,
    n_forget_authors,
    read_idk,
    read_manifest,
    read_split,
    read_split_dir,
    split_by_authors,
    write_splits,
)
from .synthetic import generate_tofu

__all__ = [
    "IDK",
    "MANIFEST",
    "PERTURBED_SPLITS",
    "QA_SPLITS",
    "ROW_KEYS",
    "SPLIT_NAMES",
    "TOFU_QA_PER_AUTHOR",
    "UTILITY_SPLITS",
    "DataError",
    "check_disjoint",
    "forget_set_hash",
    "generate_tofu",
    "load_from_config",
    "load_hub",
    "load_local",
    "load_tofu",
    "n_forget_authors",
    "perturbed_of",
    "read_idk",
    "read_manifest",
    "read_records",
    "read_split",
    "read_split_dir",
    "retain_of",
    "split_by_authors",
    "split_kind",
    "validate_rows",
    "validate_split_set",
    "validate_splits",
    "write_splits",
]
