"""One way to print a value in a table or report, so the same metric reads the same everywhere.

The summary table (``unlearn summary``), the audit reports (``unlearn audit``, the
HTML audit page) and the evaluation report used to format numbers three different
ways (``.4g``, ``.4f``, ``.3e``): the forget quality of one model printed as
``0.81`` in one place and ``0.8100`` in another. :func:`fmt_number` is the rule.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

MISSING = "n/a"
"""What a value that was not computed (None, NaN) prints as."""

TINY = 1e-3
"""Below this magnitude (and not 0) a float is printed with 3 significant digits: 4 decimals would show 0.0000
for a KS p-value such as a target model's forget quality (~1e-6)."""


def fmt_number(v: Any) -> str:
    """``None``/NaN -> ``n/a``; a float -> 4 decimals (``0.8100``), or 3 significant digits when
    ``0 < |v| < 1e-3`` (``1.2e-06``); anything else (ints, strings, bools) -> ``str(v)``."""
    if v is None:
        return MISSING
    if isinstance(v, float):
        if math.isnan(v):
            return MISSING
        return f"{v:.3g}" if v != 0 and abs(v) < TINY else f"{v:.4f}"
    return str(v)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, pad: bool = True) -> str:
    """A Markdown table (no trailing newline). Cells are ``str()``-ed as given (format numbers first);
    ``pad`` aligns the columns for reading in a terminal (the rendered table is the same either way)."""
    table = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(header))] if pad else [0] * len(header)
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(t, widths)) + " |" for t in table]
    lines.insert(1, "|" + "|".join("-" * (max(w, 1) + 2) for w in widths) + "|")
    return "\n".join(lines)
