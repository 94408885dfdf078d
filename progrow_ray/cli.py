"""Shared CLI behaviour: user mistakes print one line and exit 2; nothing half-written."""

from __future__ import annotations

import sys
from typing import Callable

from .core.errors import ConfigError


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    try:
        return main(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
