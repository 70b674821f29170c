"""The ``xattn-video`` command: one subcommand per module, found through :data:`COMMANDS`.

A subcommand module provides three names:

- ``HELP``: one line for ``xattn-video --help``; the module docstring is the subcommand's description;
- ``add_arguments(parser)``: its arguments on an ``argparse`` parser;
- ``run(args) -> int``: the work; the return value is the exit status.

A command whose trailing positionals may come after its options (``generate c.yaml --dry-run key=value``) names
their destination with ``parser.set_defaults(_positional_rest="args")``.

Adding a command (``quality``, ``vbench``, ``attn-report``, ``videomme``) is one new module and one line here.
Modules keep heavy imports (torch, diffusers) inside ``run`` so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

# name -> module; kept in the order ``--help`` lists them
COMMANDS: dict[str, str] = {
    "generate": "xattn_video.pipelines.generate",
    "quality": "xattn_video.pipelines.quality",
    "vbench": "xattn_video.pipelines.vbench_eval",
    "attn-report": "xattn_video.pipelines.attn_report",
    "videomme": "xattn_video.pipelines.videomme",
}

EXIT_USAGE = 2


class CommandError(Exception):
    """An error the user can fix (bad config, missing file): printed as one line, no traceback."""


def _load(module_name: str) -> ModuleType:
    module = importlib.import_module(module_name)
    for attr in ("HELP", "add_arguments", "run"):
        if not hasattr(module, attr):
            raise AttributeError(f"command module {module_name} lacks {attr!r}")
    return module


def build_parser(commands: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """The top-level parser with one subparser per registered command."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="xattn-video",
        description="XAttention for video models: batch generation and the jobs around it.",
        epilog="Run 'xattn-video COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in (commands or COMMANDS).items():
        module = _load(module_name)
        command = sub.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(command)
        command.set_defaults(_run=module.run, _parser=command)  # _parser: unknown options report its usage
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m xattn_video``; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(list(argv) if argv is not None else None)
    rest = getattr(args, "_positional_rest", None)
    if extra and rest and not any(item.startswith("-") for item in extra):
        getattr(args, rest).extend(extra)  # positionals given after options: `generate c.yaml --dry-run k=v`
    elif extra:  # the subcommand's usage, not the top level's: the user is inside the subcommand
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args._run(args) or 0)
    except CommandError as e:
        print(f"xattn-video {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # the machine, not the program: a full disk, a file that vanished, a lost mount
        where = f" ({e.filename})" if getattr(e, "filename", None) and str(e.filename) not in str(e) else ""
        print(f"xattn-video {args.command}: error: {type(e).__name__}: {e}{where}".splitlines()[0], file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"xattn-video {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
