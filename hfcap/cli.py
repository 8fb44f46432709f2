"""The ``hfcap`` console script.

Each subcommand lives in the module that implements it; that module exposes ``configure_parser(parser)`` and
``run(args)``. Modules are imported only when their subcommand runs, so ``hfcap --help`` stays fast and a
missing optional dependency of one subcommand never breaks another.

Errors: a subcommand raises; ``main`` prints one line, ``hfcap <command>: error: <message>``, and exits with the
status of the error's kind (``EXIT_CODES``), the same in every subcommand. ``--debug`` (or ``HFCAP_DEBUG=1``) shows
the traceback instead.
"""

import argparse
import importlib
import os
import sys

SUBCOMMANDS = {
    "caption": ("hfcap.inference", "Caption images with a saved hfcap model (optionally draw attention maps)."),
    "train": ("hfcap.training.cli", "Train a captioning model: cross-entropy, then SCST (runs under `accelerate launch`)."),
    "evaluate": ("hfcap.training.evaluation", "Generate captions for a split and score them with the COCO caption metrics."),
    "convert": ("hfcap.conversion", "Convert an original authors' checkpoint into a save_pretrained directory."),
    "push": ("hfcap.hub", "Push a saved model, its processor, generation config and model card to the Hub."),
    "data": ("hfcap.data.cli", "Dataset utilities: generate the embedded 'scenes' dataset, inspect datasets."),
}

EXIT_CODES = (
    (FileNotFoundError, 3),  # a named input file or directory does not exist
    (OSError, 4),  # a file cannot be read or written, the Hub or a URL cannot be reached
    (FloatingPointError, 5),  # training diverged
    ((ValueError, TypeError), 2),  # an invalid argument, configuration, model directory, checkpoint or input
)
"""Exception kind -> exit status (first match wins); 2 is also argparse's status for a bad command line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfcap", description="Image-captioning models the Hugging Face way.")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                               help="show the Python traceback of an error")
        subparser.set_defaults(module_name=module_name)
        importlib.import_module(module_name).configure_parser(subparser)
    return parser


def int_at_least(minimum: int):
    """argparse type of the integer flags of every subcommand: an integer >= `minimum`."""

    def parse(text: str) -> int:
        bound = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def exit_code(error: BaseException) -> int | None:
    """The exit status for `error`, or None for an unexpected kind (a bug: its traceback is shown)."""
    return next((code for kinds, code in EXIT_CODES if isinstance(error, kinds)), None)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    debug = args.debug or os.environ.get("HFCAP_DEBUG", "") not in ("", "0")
    from transformers.utils import logging as transformers_logging

    # Loading a model's weights takes a moment, not long work: no progress bar between a command and its result.
    transformers_logging.disable_progress_bar()
    try:
        return importlib.import_module(args.module_name).run(args) or 0
    except KeyboardInterrupt:
        print(f"hfcap {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        code = exit_code(error)
        if debug or code is None:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"hfcap {args.command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
