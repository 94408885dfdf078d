"""Shared CLI behaviour: user mistakes print one line and exit 2; nothing half-written."""

from __future__ import annotations

import sys
from typing import Callable

from .core.errors import ConfigError


class RunFailed(Exception):
    """A run that failed for a reason other than the user's input: one line, exit 1 (details in its log)."""


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    try:
        return main(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
