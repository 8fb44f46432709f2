"""Converters from the original authors' checkpoints to hfcap ``save_pretrained`` directories.

Python: ``convert_checkpoint(arch, checkpoint, vocab, output_dir, **overrides)``.
CLI:    ``hfcap convert <arch> --checkpoint PATH --vocab PATH --output DIR [arch-specific overrides]``.

Each architecture's converter is a module here exposing ``convert(checkpoint, vocab, output_dir, **overrides)``,
``add_arguments(parser)`` (its override flags, ``dest`` = the keyword, absent flags left out) and ``OVERRIDES`` (those
keywords). Third-party pickles are read only through :mod:`hfcap.conversion.safe_unpickle`. ``convert_checkpoint``
(which the CLI runs) then records in ``hfcap_provenance.json`` that the weights were converted, and from which files,
so that ``hfcap push`` describes them without flags.
"""

import argparse
import importlib
import sys
from pathlib import Path

from .safe_unpickle import CheckpointError

__all__ = ["CONVERTERS", "CheckpointError", "configure_parser", "convert_checkpoint", "run"]

CONVERTERS = {
    "show-attend-tell": ("hfcap.conversion.show_attend_tell", "sgrvinod tutorial checkpoint + WORDMAP json"),
}
"""CLI name → (converter module, what it reads)."""


def _converter(arch: str):
    name = arch.replace("_", "-")
    if name not in CONVERTERS:
        raise ValueError(f"unknown architecture {arch!r}; converters exist for: {', '.join(CONVERTERS)}")
    return importlib.import_module(CONVERTERS[name][0])


def convert_checkpoint(arch: str, checkpoint, vocab, output_dir, **overrides) -> Path:
    """Convert the authors' ``checkpoint`` + ``vocab`` files of ``arch`` into a ``save_pretrained`` directory.

    ``arch`` is ``"show-attend-tell"`` (``"show_attend_tell"`` also accepted); ``overrides`` are the converter's
    settings the checkpoint cannot determine (e.g. ``image_size``). The directory also gets ``hfcap_provenance.json``
    (weights "converted", source: the two file names and the architecture). Returns ``output_dir`` as a ``Path``.
    """
    # Imported here: hfcap.hub needs hfcap/__init__'s model registry, and hfcap/__init__ imports this module.
    from ..hub import write_provenance

    name = arch.replace("_", "-")
    output_dir = _converter(name).convert(checkpoint, vocab, output_dir, **overrides)
    source = f"the {name} checkpoint `{Path(checkpoint).name}` and its vocabulary `{Path(vocab).name}`"
    write_provenance(output_dir, weights="converted", source=source)
    return output_dir


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add one sub-command per architecture to ``hfcap convert``."""
    subparsers = parser.add_subparsers(dest="arch", metavar="ARCH", required=True)
    for name, (module_name, reads) in CONVERTERS.items():
        sub = subparsers.add_parser(name, help=f"convert a {reads}", description=f"Convert a {reads}.")
        sub.add_argument("--checkpoint", required=True, type=Path, help="the authors' checkpoint file")
        sub.add_argument("--vocab", required=True, type=Path, help="the authors' vocabulary file")
        sub.add_argument("--output", required=True, type=Path, help="directory to write the converted model to")
        importlib.import_module(module_name).add_arguments(sub)


def run(args: argparse.Namespace) -> int:
    """Run ``hfcap convert``; a bad or missing input file prints one clear error line and returns 1."""
    overrides = {key: getattr(args, key) for key in _converter(args.arch).OVERRIDES if hasattr(args, key)}
    try:
        output = convert_checkpoint(args.arch, args.checkpoint, args.vocab, args.output, **overrides)
    except (CheckpointError, FileNotFoundError, ValueError) as error:
        print(f"hfcap convert: error: {error}", file=sys.stderr)
        return 1
    print(f"converted {args.checkpoint} -> {output}")
    return 0
