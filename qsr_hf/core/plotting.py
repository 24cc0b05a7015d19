"""`import_pyplot`: matplotlib for the figures of ``qsr-hf plan --plot``, ``qsr-hf report`` and ``benchmarks/``.

matplotlib is optional (the ``plot`` extra); it is imported only when a figure is drawn.
"""

from typing import Any


def import_pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or an `ImportError` that names the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("drawing figures needs matplotlib: pip install 'qsr_hf[plot]'") from e
    return plt
