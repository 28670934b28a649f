"""The one place that chooses matplotlib's backend.

Reports are written to files on machines without a display, so the
non-interactive Agg backend is selected once, on first use::

    from raymanifold.analysis.plotting import pyplot
    plt = pyplot()
"""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def pyplot():
    """``matplotlib.pyplot`` with the Agg backend (selected before pyplot is first imported)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
