"""What reports share: number formatting, Markdown tables, Jinja2 templates, Matplotlib set-up
and PNG writing.

Used by every stage report (validation, split, EDA, training curves, evaluation and the model
card) and the CLI, so that a number or a table looks the same everywhere.
"""

from __future__ import annotations

import io
import math
import numbers
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pipeline.core.fsutil import atomic_write_bytes


def fmt(x: Any, digits: int = 4, missing: str = "-") -> str:
    """A number with ``digits`` decimals (integers as they are), ``missing`` for None/NaN,
    anything else as ``str``."""
    if x is None:
        return missing
    if isinstance(x, (bool, str)):
        return str(x)
    if isinstance(x, numbers.Integral):
        return str(int(x))
    if isinstance(x, numbers.Real):
        v = float(x)
        return missing if math.isnan(v) else f"{v:.{digits}f}"
    return str(x)


def md_table(
    rows: Iterable[Sequence[Any]], header: Sequence[str], digits: int = 3, align: Sequence[str] | None = None
) -> str:
    """A Markdown table; numbers through :func:`fmt` with ``digits`` decimals. ``align``: one of
    ``l``, ``r`` per column (default: right for numbers in the first row, left otherwise)."""
    rows = [list(r) for r in rows]
    if align is None:
        first = rows[0] if rows else [""] * len(header)
        align = ["r" if isinstance(v, (int, float)) and not isinstance(v, bool) else "l" for v in first]
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(fmt(v, digits) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def frame_table(df: Any, digits: int = 3) -> str:
    """:func:`md_table` of a pandas DataFrame (its columns as the header)."""
    return md_table(df.itertuples(index=False, name=None), [str(c) for c in df.columns], digits)


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path | str, dpi: int = 110) -> Path:
    """Write a Matplotlib figure as PNG atomically and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def render_template(folder: Path | str, name: str, **context: Any) -> str:
    """The Jinja2 template ``folder/name`` rendered with ``context`` (strict: a missing name is an
    error, not an empty string; no HTML escaping: the templates write Markdown and trusted HTML)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(folder)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    return env.get_template(name).render(**context)
