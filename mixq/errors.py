"""The one base class of the errors a user can cause.

A `MixqError` is a bad option, file, data set, checkpoint, frozen model, build or board: its
message names the culprit in one line, and `mixq` (mixq/cli.py) prints that line and exits 2.
Every stage's error class derives from it (TrainError, FreezeError, GraphError, CompileError,
DeployError, BoardError...); each also keeps the builtin base it had (ValueError or
RuntimeError), so code that catches those still does. Any other exception is a bug, in mixq or
below it (torch, TVM), and `mixq` shows its traceback.

Standard library only, like mixq.fsio: every module may import it."""
from __future__ import annotations


class MixqError(Exception):
    """An error the user can fix: the message says what is wrong and where, in one line."""
