"""The train stage's errors (both `MixqError`s: one line, exit 2).

ConfigError: a bad option, model or starting point, found before training starts (a ValueError,
as the config checks always raised). TrainError: a failure while training or reading a
checkpoint (a RuntimeError)."""
from __future__ import annotations

from mixq.errors import MixqError


class ConfigError(MixqError, ValueError):
    """A training option, model or --init-from file that cannot work (one line naming it)."""


class TrainError(MixqError, RuntimeError):
    """A run that cannot start, continue or finish, or a checkpoint that cannot be read."""
