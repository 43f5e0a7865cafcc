"""User-facing errors: one line naming the problem and the fix, a non-zero exit, no traceback."""

import functools
import sys


class DDOPatchError(Exception):
    """Bad input or environment. The message is one line that names the problem and says how to fix it."""


EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 75   # EX_TEMPFAIL of sysexits.h: interrupted by a signal and checkpointed; rerun the same command to resume


def exit_on_user_error(fn):
    """Wrap an entry point so that a DDOPatchError prints `error: <message>` and exits with status 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DDOPatchError as err:
            print(f'error: {err}', file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
    return wrapper
