"""Saving a matplotlib figure as a report PNG: laid out, written atomically, closed."""

from __future__ import annotations

from pathlib import Path

from pipeline.files import atomic_path


def save_png(fig, path: str | Path) -> None:
    """`fig` laid out tight and saved to `path` as a 120-dpi PNG atomically (a crash leaves no half-written file);
    the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
