"""m3bsr: multi-modal multi-behavior sequential recommendation (M3BSR, SIGIR 2025).

The layers, in the direction of their arrows: ``data`` (files → tables → tensors),
``models`` (tensors → scores, pure torch), ``engine`` (training and evaluation),
``compare``/``sweep``/``serving`` and the ``cli``.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``m3bsr.Estimator`` (:mod:`m3bsr.api`), imported on first use: ``import m3bsr`` stays light."""
    if name == "Estimator":
        from m3bsr.api import Estimator

        return Estimator
    raise AttributeError(f"module 'm3bsr' has no attribute {name!r}")
