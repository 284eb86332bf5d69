"""Training, resuming and evaluating RANet from the command line (``ranet-train``).

``python -m ranet_fast.train`` and the ``ranet-train`` console script call
``ranet_fast.train.__main__.main``; the flags are the official RANet-pytorch ones plus a few
runtime options (see ``ranet_fast.train.args``).
"""

from .args import build_parser, parse_args

__all__ = ["build_parser", "main", "parse_args"]


def __getattr__(name: str):
    # Imported on first use only: importing __main__ eagerly here would make ``python -m
    # ranet_fast.train`` load that module twice (runpy warns about it).
    if name == "main":
        from .__main__ import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
