"""The ``hfcap`` console script.

Each subcommand lives in the module that implements it; that module exposes ``configure_parser(parser)`` and
``run(args)``. Modules are imported only when their subcommand runs, so ``hfcap --help`` stays fast and a
missing optional dependency of one subcommand never breaks another.
"""

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "caption": ("hfcap.inference", "Caption images with a saved hfcap model (optionally draw attention maps)."),
    "train": ("hfcap.training.cli", "Train a captioning model: cross-entropy, then SCST (runs under `accelerate launch`)."),
    "evaluate": ("hfcap.training.evaluation", "Generate captions for a split and score them with the COCO caption metrics."),
    "convert": ("hfcap.conversion", "Convert an original authors' checkpoint into a save_pretrained directory."),
    "push": ("hfcap.hub", "Push a saved model, its processor, generation config and model card to the Hub."),
    "data": ("hfcap.data.cli", "Dataset utilities: generate the embedded 'scenes' dataset, inspect datasets."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfcap", description="Image-captioning models the Hugging Face way.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.configure_parser(subparser)
        subparser.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
