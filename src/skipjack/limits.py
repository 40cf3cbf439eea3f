"""Limits shared across layers, defined once."""

MAX_DRAFT = 64  # draft nodes verified in one step at most; sliding caches keep twice this as rollback slack
