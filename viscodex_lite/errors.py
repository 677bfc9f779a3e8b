"""The kit's user-facing errors. The CLI prints their message (no traceback) and exits with 2.

Every message says what went wrong, where (file, tensor, record, case) and what to do next.
"""

from __future__ import annotations


class KitError(Exception):
    """Base class of errors caused by the user's input or environment, not by a bug in the kit."""
