"""``hfcap train`` and ``examples/train.py``: parse ``--config FILE [--resume] [key=value ...]`` and run the trainer.

Runs under ``accelerate launch`` for several processes or GPUs, e.g. ``accelerate launch --multi_gpu
--num_processes 2 -m hfcap.cli train --config examples/configs/scenes_default.yaml``; on a CPU-only machine add
``ACCELERATE_USE_CPU=true`` (``--cpu`` silently runs a single process).
"""

import logging


def configure_parser(parser):
    """Arguments of ``hfcap train``."""
    parser.add_argument("--config", required=True, help="YAML/JSON training config")
    parser.add_argument("--resume", action="store_true",
                        help="Continue the run in output_dir from its latest checkpoint (fresh start if none).")
    parser.add_argument("--output-dir", help="Shortcut for the override output_dir=DIR.")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="Config overrides with dotted keys, values as YAML, e.g. stages.xe.lr=1e-3 "
                             "data.max_train_images=500 (a stage by name or index).")


def run(args) -> int:
    """Load the config (file + overrides), train, evaluate; errors reach ``hfcap.cli``."""
    from .config import TrainingConfig
    from .trainer import train

    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    config = TrainingConfig.load(args.config, overrides)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("hfcap").setLevel(logging.INFO)
    train(config, resume=args.resume)
    return 0
