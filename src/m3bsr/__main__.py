"""``python -m m3bsr`` (also what ``torchrun -m m3bsr train ...`` runs)."""

from m3bsr.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
