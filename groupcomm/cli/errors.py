"""How the command line reports errors: one line on stderr and an exit status.

Library code raises exceptions (and, from inside trio, exception groups); only
the command line turns the ones a user can cause into a message.  Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import sys

from groupcomm.errors import ConfigError, GroupcommError

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CliError",
    "JoinTimedOut",
    "UsageError",
    "contains",
    "interrupted",
    "leaves",
    "report",
    "user_error",
]

EXIT_OK = 0
EXIT_FAILED = 1
"""The command ran but did not succeed (no first view, nobody answered a probe, a demo check failed)."""
EXIT_USAGE = 2
"""A command-line or configuration error: the command cannot work as given."""

PREFIX = "groupcomm: error: "


class CliError(Exception):
    """An error the user can act on; :func:`report` prints it as one line."""

    exit_status = EXIT_FAILED


class UsageError(CliError):
    """A bad option or setting (exit status 2)."""

    exit_status = EXIT_USAGE


class JoinTimedOut(CliError):
    """No first view was installed within the join timeout (exit status 1)."""


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or ``[exc]``."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


def contains(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``exc`` is, or its groups hold, an exception of type ``kind``."""
    return any(isinstance(leaf, kind) for leaf in leaves(exc))


def _is_cancellation(exc: BaseException) -> bool:
    # trio.Cancelled rides along with the real error when a nursery unwinds.
    # Checked by name so that reporting an error never imports trio.
    return type(exc).__module__.startswith("trio") and type(exc).__name__ == "Cancelled"


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is a KeyboardInterrupt (alone, or in groups with cancellations)."""
    found = leaves(exc)
    return any(isinstance(leaf, KeyboardInterrupt) for leaf in found) and all(
        isinstance(leaf, KeyboardInterrupt) or _is_cancellation(leaf) for leaf in found
    )


def _explain(exc: BaseException) -> CliError | None:
    if isinstance(exc, CliError):
        return exc
    if isinstance(exc, ConfigError):
        message = str(exc)
        cause = exc.__cause__
        if isinstance(cause, OSError) and cause.errno == errno.EADDRNOTAVAIL:
            message += " (is that an address of this host? choose one with --bind)"
        return UsageError(message)
    if isinstance(exc, OSError):
        return UsageError(f"network: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
    if isinstance(exc, GroupcommError):                 # e.g. DeliveryOverflow: the member left the group
        return CliError(f"{type(exc).__name__}: {exc}")
    return None


def user_error(exc: BaseException) -> CliError | None:
    """The one error to show for ``exc``, or None when it is not one a user causes (a bug).

    Exception groups are unwrapped: cancellations are ignored, and every other
    exception inside must be explainable; the first one is shown.
    """
    found: list[CliError] = []
    for leaf in leaves(exc):
        if _is_cancellation(leaf):
            continue
        explained = _explain(leaf)
        if explained is None:
            return None
        found.append(explained)
    return found[0] if found else None


def report(exc: BaseException) -> int:
    """Print ``exc`` as one line and return the exit status; re-raises what is not a user's error."""
    error = user_error(exc)
    if error is None:
        raise exc
    print(PREFIX + " ".join(str(error).split()), file=sys.stderr)
    return error.exit_status
