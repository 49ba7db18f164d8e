"""Errors a person can act on: bad input (config, data file and line, paths, checkpoints).

They are ValueErrors, so library callers catch them as before; `str()` reads `<what> (<where>)`. The CLI
prints them as one line, `rlhf-fast: error: <what> (<where>)`, and exits 2 (`--debug` or RLHF_FAST_DEBUG=1
shows the traceback). A ConfigError's `where` is the setting's "section.key", which the CLI turns into
the flag that sets it; a DataError's is "file:line".
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input with the place to fix it (`where`: a file, "file:line", a flag or a config key)."""

    def __init__(self, what: str, where: str | None = None):
        self.what, self.where = what, where
        super().__init__(f"{what} ({where})" if where else what)


class ConfigError(UserError):
    """An invalid setting; `where` is its "section.key" (or "key" for a flat config)."""


class DataError(UserError):
    """A bad record or data file; `where` is "file:line" (or the file)."""


class CheckpointError(UserError):
    """A missing, foreign or unreadable checkpoint; `where` is its path."""
