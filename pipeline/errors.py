"""The engine's own errors: a broken run config, a workflow whose steps do not fit together. Row rejects
and their codes are the data contract every layer shares: :mod:`common.rejects`."""
from __future__ import annotations


class ConfigError(Exception):
    """A broken run config: names the file, the key path and what was expected."""

    def __init__(self, file: str, key: str, message: str):
        self.file, self.key, self.message = file, key, message
        super().__init__(f"{file}: {key}: {message}" if key else f"{file}: {message}")


class ContractError(Exception):
    """A workflow whose steps read columns or artifacts nobody wrote."""

