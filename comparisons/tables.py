"""Table primitives every renderer shares: method titles, Markdown tables, CSV files.

They sit below :mod:`comparisons.report`, :mod:`comparisons.mirman_report`
and :mod:`comparisons.theorem_report`, so none of those imports another to
get them (no import circles).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import List

from linf_plugin.io import atomic_write_text
from linf_plugin.names import Method

__all__ = ["METHOD_TITLES", "STATUS_CELL", "md_table", "write_csv"]

#: The table title of every method, in column order.
METHOD_TITLES = {Method.MARGIN: "margin", Method.INTERVAL: "interval", Method.IBP: "IBP",
                 Method.CROWN_IBP: "CROWN-IBP", Method.CROWN: "CROWN", Method.ALPHA_CROWN: "α-CROWN"}
STATUS_CELL = {"n/a": "n/a", "not run": "—", "error": "error"}


def md_table(header: List[str], rows: List[List[str]]) -> str:
    """A GitHub Markdown table (cells may not contain ``|``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in r) + " |")
    return "\n".join(lines)


def write_csv(path: Path, fields: List[str], rows: List[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    atomic_write_text(path, buf.getvalue())
