"""Data layer: files → tables → tensors. Never imports :mod:`m3bsr.models`."""
