"""What the benchmark programs' command lines share: `-o/--output`, with `--out`, its earlier spelling."""

from __future__ import annotations

import argparse
import sys
from typing import Any


class _Spelling(argparse.Action):
    """Stores the value of one of an option's two spellings: the old one says it is deprecated; giving both is refused
    (the second finds the value no longer the parser's default)."""

    def __init__(self, *args: Any, new: str, old: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.new, self.old = new, old

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if getattr(namespace, self.dest) is not parser.get_default(self.dest):
            parser.error(f"{self.old} and {self.new} are one option under two names; give {self.new} only")
        if option_string == self.old:
            print(f"warning: {self.old} is deprecated and goes in the next release; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_output(parser: argparse.ArgumentParser, default: Any, help: str | None = None, **kwargs: Any) -> None:
    """`-o/--output` into `args.out`; `--out`, the earlier spelling, still works for one release (hidden, with a
    deprecation line on stderr)."""
    common = dict(dest="out", default=default, action=_Spelling, new="--output", old="--out", **kwargs)
    parser.add_argument("-o", "--output", help=help, metavar="OUTPUT", **common)
    parser.add_argument("--out", help=argparse.SUPPRESS, **common)
