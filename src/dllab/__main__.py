"""``python -m dllab`` (and ``torchrun -m dllab``) runs the same CLI as ``dllab``."""

from dllab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
