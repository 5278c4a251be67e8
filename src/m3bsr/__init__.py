"""m3bsr: multi-modal multi-behavior sequential recommendation (M3BSR, SIGIR 2025).

The layers, in the direction of their arrows: ``data`` (files → tables → tensors),
``models`` (tensors → scores, pure torch), ``engine`` (training and evaluation),
``compare``/``sweep``/``serving`` and the ``cli``.
"""

__version__ = "0.1.0"
