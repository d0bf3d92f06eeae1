"""The base error type and the exit codes of every lesionflow command.

A :class:`LesionflowError` is a problem a user can cause and fix (a bad parameter, data row, image,
file or request): its message names the culprit (the file, row, field or key) and says what to do.
Entry points print the message (never a traceback) and exit with :data:`EXIT_USER_ERROR`; anything
else is a bug and crashes with its traceback.

Exit codes (stages, flows and the CLI alike):

* :data:`EXIT_OK` (0): done, including a verdict that is data (failed gates are recorded, not raised);
* :data:`EXIT_FAILED` (1): the command ran and its answer is "no" (the data contract is violated,
  no image could be read, the flow ended in a failed state);
* :data:`EXIT_USER_ERROR` (2): the command could not run as asked (:class:`LesionflowError`).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USER_ERROR = 2


class LesionflowError(Exception):
    """A user-causable problem; the message names the file, row, field or key."""

    exit_code: int = EXIT_USER_ERROR
