"""The `swapmoe` command line. Libraries raise; this module configures logging, prints and exits.

Any `SwapMoEError` (bad input) becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable, Sequence

from .errors import SwapMoEError

log = logging.getLogger("swapmoe_gguf")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise SwapMoEError(f"{self.prog}: {message}")


def _cmd_convert(a: argparse.Namespace) -> int:
    from .converters import convert
    from .inspect import fmt_bytes

    r = convert(a.src, a.output, a.type, force=a.force, progress=None if a.progress else False, threads=a.threads)
    if not r.written:
        print(f"{a.src}: {r.note}")
        return 0
    align = "expert slices page-aligned" if r.slices_aligned else "tensor starts page-aligned (see warning)"
    print(f"wrote {r.output} ({r.arch}, {fmt_bytes(r.bytes_written)}) in {r.seconds:.1f} s; {align}")
    return 0


def _cmd_inspect(a: argparse.Namespace) -> int:
    from .gguf_info import read_gguf
    from .inspect import render, summary

    s = summary(read_gguf(a.model))
    print(json.dumps(s, indent=2) if a.json else render(s))
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(a.dir, force=a.force)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="swapmoe", description="SwapMoE: Mixture-of-Experts GGUF models under a memory budget")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    c = sub.add_parser("convert", help="HF checkpoint or GGUF -> swap-ready GGUF")
    c.add_argument("src", help="Hugging Face checkpoint directory, or an existing .gguf to re-lay out")
    c.add_argument("-o", "--output", required=True, help="output .gguf path")
    c.add_argument("--type", default=None, metavar="TYPE",
                   help="f32, f16 (default), bf16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k (HF checkpoints only)")
    c.add_argument("--force", action="store_true", help="overwrite an existing output")
    c.add_argument("-t", "--threads", type=int, default=0, help="threads for llama.cpp's K-quantizer")
    c.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    c.set_defaults(func=_cmd_convert)

    i = sub.add_parser("inspect", help="describe a GGUF and whether it is swap-ready")
    i.add_argument("model", help=".gguf file")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=_cmd_inspect)

    d = sub.add_parser("demo", help="build a tiny MoE checkpoint, convert, inspect and run it")
    d.add_argument("--dir", default=None, help="work directory (default: user cache)")
    d.add_argument("--force", action="store_true", help="rebuild even if cached")
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        a = build_parser().parse_args(argv)
        logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(a.verbose, 2)],
                            format="swapmoe: %(levelname)s: %(message)s")
        if a.command is None:
            build_parser().print_help()
            return 2
        func: Callable[[argparse.Namespace], int] = a.func
        return func(a)
    except SwapMoEError as e:
        print(f"swapmoe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("swapmoe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
