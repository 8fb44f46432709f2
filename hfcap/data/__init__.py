"""Caption datasets: Karpathy / COCO / folder loaders and the embedded procedural "scenes" dataset.

``datasets`` is imported only when a loader runs, so importing this package works without it.
"""

from .loaders import load_caption_folder, load_coco_captions, load_karpathy
from .scenes import generate_scenes, load_scenes

__all__ = ["generate_scenes", "load_caption_folder", "load_coco_captions", "load_karpathy", "load_scenes"]
