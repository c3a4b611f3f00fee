"""``python -m flymy_receiver``: the same command line as ``flymy-receiver``."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
