"""Errors in three kinds, each shown to the user as one line:

- **bad input** (an option, a request field, a file the user points at): `SkipjackError`; CLI exit 2 with
  `skipjack: error: ...`, HTTP 400 (or the 4xx the server names);
- **a resource or the environment** (a lock held past its wait, a full or read-only disk, a file that cannot be
  read, the network): `Unavailable`, a `SkipjackError`; CLI exit 2 with `skipjack: error: ...`, HTTP 503 with
  Retry-After;
- **a fault** (a NaN from the model, a broken invariant): `Fault`, not a `SkipjackError`; CLI exit 1 with
  `skipjack: internal error: ...`, HTTP 500.

Exit 2 is for everything the user can act on (fix the input, free the disk, wait for the other process), as
argparse and llama.cpp's tools exit non-zero with a message for both; HTTP tells the two apart, because a client
retries a 503 and not a 400. A fault is skipjack's (or the model file's) problem, never the request's: like any
other bug it is exit 1 and HTTP 500, but with its own message instead of an exception's type. `SKIPJACK_DEBUG=1`
shows a fault's or a bug's traceback in the CLI.
"""


class SkipjackError(Exception):
    """A problem with the user's input, phrased for the user (no traceback): CLI exit 2, HTTP 400."""


class Unavailable(SkipjackError):
    """A resource or environment problem (a lock, the disk, a file's permissions, the network), phrased for the
    user: CLI exit 2, HTTP 503 with Retry-After (it may work later, unchanged)."""


class Fault(Exception):
    """Something that must not happen whatever the input: non-finite logits from the model, a broken
    invariant. CLI exit 1 (`skipjack: internal error: ...`), HTTP 500."""


RETRY_AFTER_S = 5  # what a 503 for an `Unavailable` tells the client to wait


def one_line(message: str, limit: int = 400) -> str:
    """A message as one line (a library's multi-line text joined), cut at `limit` characters."""
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def http_status(e: BaseException) -> int:
    """The HTTP status of an error: 503 for an `Unavailable`, 400 for other bad input, 500 for a fault or a bug."""
    if isinstance(e, Unavailable):
        return 503
    return 400 if isinstance(e, SkipjackError) else 500


def message(e: BaseException) -> str:
    """An error as its one line for a client or stderr (without the `skipjack:` prefix): the message of a
    `SkipjackError`; "internal error: ..." for a fault (its message) or a bug (its type and message)."""
    if isinstance(e, SkipjackError):
        return one_line(str(e))
    if isinstance(e, Fault):
        return one_line(f"internal error: {e}")
    return one_line(f"internal error: {type(e).__name__}: {e}")


def run_command(body) -> int:
    """Exit status of a `python -m skipjack...` command: 0 when body() returns; 2 with one line on stderr for a
    SkipjackError (bad input or `Unavailable`), an OS error or a JSON file that does not parse; 1 with one line
    for a `Fault`."""
    import json
    import sys

    try:
        body()
    except (SkipjackError, OSError, json.JSONDecodeError) as e:
        print(f"skipjack: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except Fault as e:
        print(f"skipjack: {message(e)}", file=sys.stderr)
        return 1
    return 0
