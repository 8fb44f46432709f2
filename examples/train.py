"""Train a captioning model: cross-entropy, then SCST, then the test metrics (``hfcap.training``).

    accelerate launch examples/train.py                                    # the default scenes run
    accelerate launch examples/train.py --config examples/configs/sat_coco.yaml data.json_path=... data.images_root=...
    accelerate launch examples/train.py --resume                           # continue a killed run
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/train.py   # 2 CPU processes
"""

import argparse
import sys
from pathlib import Path

from hfcap.training.cli import configure_parser, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_parser(parser, default_config=str(Path(__file__).resolve().parent / "configs" / "scenes_default.yaml"))
    sys.exit(run(parser.parse_args()))
