"""User-facing errors. The CLI prints these as one line and exits non-zero; the server maps them to 4xx."""


class SkipjackError(Exception):
    """A problem with the user's input or environment, phrased for the user (no traceback)."""


def one_line(message: str, limit: int = 400) -> str:
    """A message as one line (a library's multi-line text joined), cut at `limit` characters."""
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_command(body) -> int:
    """Exit status of a `python -m skipjack...` command: 0 when body() returns; 2 with one line on stderr for a
    SkipjackError, an OS error or a JSON file that does not parse."""
    import json
    import sys

    try:
        body()
    except (SkipjackError, OSError, json.JSONDecodeError) as e:
        print(f"skipjack: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    return 0
