"""Command line: ``llmkern info | bench | train | generate`` (also ``python -m llmkern``).

Each subcommand lives in its own module with a ``main(argv) -> int``; it is imported only
when asked for, so ``llmkern info`` stays quick.
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

COMMANDS = {
    "info": ("llmkern.info", "versions, devices, backends and a correctness self-check"),
    "bench": ("llmkern.bench.cli", "benchmark the kernels against their references"),
    "train": ("llmkern.train", "train a GPT (default: the embedded corpus, no download)"),
    "generate": ("llmkern.generate", "sample text from a checkpoint"),
}


def _usage() -> str:
    lines = ["usage: llmkern <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'llmkern <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"llmkern: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
