"""Command line: ``llmkern [--version] <command> ...`` (also ``python -m llmkern``).

Every command is a module exposing ``add_arguments(parser)`` and ``run(args) -> int``. The
dispatcher imports only the chosen one (``llmkern info`` stays quick), builds its parser and
runs it. A user error (``CLIError``, ``ValueError``, ``TypeError``, ``OSError``) is printed as
``llmkern <command>: error: <message>`` on one line with exit code 2, no traceback
(``LLMKERN_DEBUG=1`` shows it); Ctrl-C exits with 130.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from types import ModuleType
from typing import Callable, Optional, Sequence

COMMANDS = {
    "info": ("llmkern.info", "versions, devices, backends and a correctness self-check"),
    "bench": ("llmkern.bench.cli", "benchmark the kernels against their references"),
    "train": ("llmkern.train_cli", "train a GPT (default: the embedded corpus, no download)"),
    "generate": ("llmkern.generate", "sample text from a checkpoint"),
    "export": ("llmkern.export", "one safetensors file (or a GPT-2 folder) from a checkpoint, "
                                 "sharded ones included"),
}
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
DEBUG_ENV = "LLMKERN_DEBUG"


class CLIError(Exception):
    """A user mistake a command reports (bad flag value, unusable file): one line, exit 2."""


USER_ERRORS = (CLIError, ValueError, TypeError, OSError)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (those flags say in their help what they default to)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


# ---- shared option helpers -----------------------------------------------------------------

def available_cores() -> int:
    """CPU cores this process may run on (a container's affinity, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


SMALL_MODEL_PARAMS = 20_000_000


def default_threads(params: Optional[int] = None) -> int:
    """Intra-op threads for a CPU run. A model under SMALL_MODEL_PARAMS gets one: its matmuls
    are too small to split, and threads that outnumber free cores cost far more than they
    give (the default 0.8M-parameter model on 2 busy cores: 0.8 s a step with 1 thread, 2.6 s
    with 2). Larger ones get min(4, cores), shared among the processes of a torchrun node."""
    if params is not None and params < SMALL_MODEL_PARAMS:
        return 1
    per_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(4, available_cores() // per_node))


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def add_threads_argument(parser) -> None:
    """``--threads N`` (default None: ``default_threads``); pass the value to ``apply_threads``."""
    parser.add_argument("--threads", type=_threads, default=None, metavar="N",
                        help=f"CPU threads for torch (default: 1 for models under "
                             f"{SMALL_MODEL_PARAMS // 1_000_000}M parameters, else min(4, cores))")


def apply_threads(threads: Optional[int], params: Optional[int] = None) -> int:
    """Set torch's intra-op threads to ``threads`` (None: ``default_threads(params)``, with
    ``params`` the model's parameter count when known); return the number set."""
    import torch

    n = default_threads(params) if threads is None else threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CLIError(f"--threads must be an integer >= 1, got {threads!r}")
    torch.set_num_threads(n)
    return n


# ---- running a command ---------------------------------------------------------------------

def error_message(exc: BaseException) -> str:
    """The one line a user error prints: its message with newlines folded."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def command_name(module: ModuleType) -> str:
    for name, (path, _) in COMMANDS.items():
        if path == module.__name__:
            return name
    return module.__name__.rsplit(".", 1)[-1]


def build_parser(module: ModuleType, name: Optional[str] = None) -> argparse.ArgumentParser:
    name = name or command_name(module)
    doc = (module.__doc__ or "").strip().split("\n\n")[0].replace("``", "")
    parser = argparse.ArgumentParser(prog=f"llmkern {name}", description=doc or None,
                                     formatter_class=HelpFormatter)
    module.add_arguments(parser)
    return parser


def guarded(name: str, call: Callable[[], Optional[int]]) -> int:
    """Run ``call``; user errors and Ctrl-C become one line on stderr and an exit code."""
    try:
        return int(call() or 0)
    except KeyboardInterrupt:
        print(f"llmkern {name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `llmkern info | head`: the reader left; not an error of ours
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except USER_ERRORS as exc:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            import traceback

            traceback.print_exc()
        print(f"llmkern {name}: error: {error_message(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR


def run_command(module: ModuleType, argv: Optional[Sequence[str]] = None,
                name: Optional[str] = None) -> int:
    """Parse ``argv`` with the command's ``add_arguments`` and call its ``run``; what a
    command's ``main(argv=None)`` returns."""
    name = name or command_name(module)
    args = build_parser(module, name).parse_args(sys.argv[1:] if argv is None else list(argv))
    return guarded(name, lambda: module.run(args))


def _usage() -> str:
    lines = ["usage: llmkern [--version] <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'llmkern <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else EXIT_USER_ERROR
    if argv[0] in ("-V", "--version"):
        from llmkern import __version__

        print(f"llmkern {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"llmkern: error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return EXIT_USER_ERROR
    module = None

    def load():
        nonlocal module
        from llmkern.backends import get_backend

        get_backend()  # a bad LLMKERN_BACKEND is one error line before any work
        module = importlib.import_module(COMMANDS[name][0])

    rc = guarded(name, load)
    if module is None:
        return rc
    if hasattr(module, "add_arguments") and hasattr(module, "run"):
        return run_command(module, rest, name)
    return guarded(name, lambda: module.main(rest))  # a command not yet on add_arguments/run


if __name__ == "__main__":
    raise SystemExit(main())
