"""Converters from the original authors' checkpoints to hfcap ``save_pretrained`` directories.

Python: ``convert_checkpoint(arch, checkpoint, vocab, output_dir, **overrides)``.
CLI:    ``hfcap convert <arch> --checkpoint PATH --vocab PATH --output DIR [arch-specific overrides]``.

Each architecture of the registry (``hfcap.models.ARCHITECTURES``) names its converter module, which exposes
``convert(checkpoint, vocab, output_dir, **overrides)``, ``add_arguments(parser)`` (its override flags, ``dest`` =
the keyword, absent flags left out), ``OVERRIDES`` (those keywords, named after the config fields; ``image_size`` is
the processor's) and ``READS`` (what it reads, for ``--help``). Third-party pickles are read only through
:mod:`hfcap.conversion.safe_unpickle`, each converter with its own allowlist. ``convert_checkpoint`` (which the CLI
runs) checks the overrides every converter shares, then records in ``hfcap_provenance.json`` that the weights were
converted, and from which files, so that ``hfcap push`` describes them without flags.
"""

import argparse
import importlib
from pathlib import Path

from ..errors import configuration_errors
from ..models import ARCHITECTURES, get_architecture
from ..provenance import write_provenance
from .safe_unpickle import CheckpointError

__all__ = ["CheckpointError", "configure_parser", "convert_checkpoint", "run"]

SHARED_OVERRIDES = {"image_size": (8, 4096), "num_beams": (1, 64), "max_new_tokens": (1, 512)}
"""Overrides every converter takes, with their allowed ranges: the processor's square image side, and the generation
defaults written to generation_config.json."""


def _converter(arch: str):
    architecture = get_architecture(arch)
    if architecture.converter is None:
        raise ValueError(f"{architecture.cli_name} has no converter from an authors' checkpoint")
    return importlib.import_module(architecture.converter)


def check_overrides(overrides: dict) -> None:
    """Refuse values of the shared overrides that would write an unusable directory (e.g. ``image_size=0``)."""
    for name, (low, high) in SHARED_OVERRIDES.items():
        value = overrides.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
            raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def convert_checkpoint(arch: str, checkpoint, vocab, output_dir, **overrides) -> Path:
    """Convert the authors' ``checkpoint`` + ``vocab`` files of ``arch`` into a ``save_pretrained`` directory.

    ``arch`` is an architecture's CLI name or model type (``"expansionnet-v2"``, ``"expansionnet_v2"``);
    ``overrides`` are the settings the checkpoint cannot determine (the converter's ``OVERRIDES``). The directory also
    gets ``hfcap_provenance.json`` (weights "converted", source: the two file names and the architecture). Returns
    ``output_dir`` as a ``Path``.
    """
    converter = _converter(arch)
    unknown = sorted(set(overrides) - set(converter.OVERRIDES))
    if unknown:
        raise ValueError(f"{arch} takes no override {', '.join(unknown)}; it takes {', '.join(converter.OVERRIDES)}")
    check_overrides(overrides)
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"--output {output_dir} exists and is not a directory")
    name = get_architecture(arch).cli_name
    with configuration_errors(f"the {name} configuration built from {checkpoint}"):
        output_dir = converter.convert(checkpoint, vocab, output_dir, **overrides)
    source = f"the {name} checkpoint `{Path(checkpoint).name}` and its vocabulary `{Path(vocab).name}`"
    write_provenance(output_dir, weights="converted", source=source)
    return output_dir


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add one sub-command per architecture with a converter to ``hfcap convert``."""
    subparsers = parser.add_subparsers(dest="arch", metavar="ARCH", required=True)
    for architecture in ARCHITECTURES.values():
        if architecture.converter is None:
            continue
        module = importlib.import_module(architecture.converter)
        sub = subparsers.add_parser(architecture.cli_name, help=f"convert {module.READS}",
                                    description=f"Convert {module.READS}.")
        sub.add_argument("--checkpoint", required=True, type=Path, help="the authors' checkpoint file")
        sub.add_argument("--vocab", required=True, type=Path, help="the authors' vocabulary file")
        sub.add_argument("--output", required=True, type=Path, help="directory to write the converted model to")
        module.add_arguments(sub)


def run(args: argparse.Namespace) -> int:
    """Run ``hfcap convert``; errors reach ``hfcap.cli``, which prints them as one line."""
    overrides = {key: getattr(args, key) for key in _converter(args.arch).OVERRIDES if hasattr(args, key)}
    output = convert_checkpoint(args.arch, args.checkpoint, args.vocab, args.output, **overrides)
    print(f"converted {args.checkpoint} -> {output}")
    return 0
