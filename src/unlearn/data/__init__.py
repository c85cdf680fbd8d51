"""The data layer: TOFU-format splits from a synthetic generator, local files or the hub, in one validated schema.

Typical use (the ``data`` stage)::

    from unlearn.data import load_from_config, write_splits, read_split
    write_splits(load_from_config(params.data), params.data.out_dir)
    forget = read_split(params.data.out_dir, params.data.forget_split)
"""

from .loaders import TOFU_QA_PER_AUTHOR, load_from_config, load_hub, load_local, load_tofu, read_records
from .schema import (
    IDK,
    PERTURBED_SPLITS,
    QA_SPLITS,
    ROW_KEYS,
    SPLIT_NAMES,
    UTILITY_SPLITS,
    DataError,
    check_disjoint,
    split_kind,
    validate_rows,
    validate_splits,
)
from .splits import n_forget_authors, read_idk, read_split, read_splits, split_by_authors, write_splits
from .synthetic import generate_tofu

__all__ = [
    "IDK",
    "PERTURBED_SPLITS",
    "QA_SPLITS",
    "ROW_KEYS",
    "SPLIT_NAMES",
    "TOFU_QA_PER_AUTHOR",
    "UTILITY_SPLITS",
    "DataError",
    "check_disjoint",
    "generate_tofu",
    "load_from_config",
    "load_hub",
    "load_local",
    "load_tofu",
    "n_forget_authors",
    "read_idk",
    "read_records",
    "read_split",
    "read_splits",
    "split_by_authors",
    "split_kind",
    "validate_rows",
    "validate_splits",
    "write_splits",
]
