"""User-facing errors. The CLI prints these as one line and exits non-zero; the server maps them to 4xx."""


class SkipjackError(Exception):
    """A problem with the user's input or environment, phrased for the user (no traceback)."""
