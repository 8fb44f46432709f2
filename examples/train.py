"""Train a captioning model: cross-entropy, then SCST, then the test metrics (``hfcap.training``).

    accelerate launch examples/train.py                                    # the default scenes run
    accelerate launch examples/train.py --config examples/configs/sat_coco.yaml data.json_path=... data.images_root=...
    accelerate launch examples/train.py --resume                           # continue a killed run
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/train.py   # 2 CPU processes

The same as ``hfcap train`` with ``--config`` defaulting to ``examples/configs/scenes_default.yaml`` (a later
``--config`` replaces it); errors are one line on stderr, ``--debug`` shows the traceback.
"""

import sys
from pathlib import Path

from hfcap.cli import main

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "scenes_default.yaml"

if __name__ == "__main__":
    sys.exit(main(["train", "--config", str(DEFAULT_CONFIG), *sys.argv[1:]]))
