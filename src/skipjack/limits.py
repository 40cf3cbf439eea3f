"""Limits shared across layers, defined once."""

MAX_DRAFT = 64  # draft nodes verified in one step at most; sliding caches keep twice this as rollback slack
MAX_N = 16  # completions of one request at most (the server's `n`, the CLI's `--num`, superposed's k)
