"""Training and evaluation engine: the loop, both evaluation protocols, checkpoints and run directories.

Modules: :mod:`metrics` (pure functions of ranks), :mod:`evaluate` (sampled + chunked full ranking),
:mod:`checkpoint` (atomic, verified, ``weights_only`` checkpoints), :mod:`runs` (run directory layout),
:mod:`train` (the loop, early stopping, exact resume), :mod:`commands` (the CLI entry points).
"""
