"""``hfcap train`` and ``examples/train.py``: parse ``--config FILE [--resume] [key=value ...]`` and run the trainer.

Runs under ``accelerate launch`` for several processes or GPUs, e.g. ``accelerate launch --multi_gpu
--num_processes 2 -m hfcap.cli train --config examples/configs/scenes_default.yaml``; on a CPU-only machine add
``ACCELERATE_USE_CPU=true`` (``--cpu`` silently runs a single process).
"""

import logging
import sys


def configure_parser(parser, default_config=None):
    """Arguments of ``hfcap train`` (``default_config``: the config used when ``--config`` is not given)."""
    parser.add_argument("--config", default=default_config, required=default_config is None,
                        help="YAML/JSON training config" + (f" (default: {default_config})" if default_config else ""))
    parser.add_argument("--resume", action="store_true",
                        help="Continue the run in output_dir from its latest checkpoint (fresh start if none).")
    parser.add_argument("--output-dir", help="Shortcut for the override output_dir=DIR.")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="Config overrides with dotted keys, values as YAML, e.g. stages.xe.lr=1e-3 "
                             "data.max_train_images=500 (a stage by name or index).")


def run(args) -> int:
    """Load the config (file + overrides), train, evaluate; 2 on a configuration error."""
    from .config import TrainingConfig
    from .trainer import check_model_type, train

    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    try:
        config = TrainingConfig.load(args.config, overrides)
        check_model_type(config)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("hfcap").setLevel(logging.INFO)
    train(config, resume=args.resume)
    return 0
