"""Placeholder replaced by the benchmark runner."""


def add_arguments(p):
    p.add_argument("--out", required=True)


def main(a):
    raise NotImplementedError
