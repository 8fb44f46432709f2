"""Captioning metrics: fast exact CIDEr-D (SCST rewards), the COCO caption protocol and an ``evaluate`` module.

Importing this package needs only numpy; pycocoevalcap (and Java) are needed when COCO metrics are computed.
"""

from pathlib import Path

from .cider import CiderD, cider_d_corpus, simple_tokenize
from .coco import METRIC_NAMES, compute_caption_metrics, format_metrics_table, ptb_tokenize, spice_jars


def evaluate_module_path() -> str:
    """Directory of the local ``evaluate`` module: ``evaluate.load(evaluate_module_path())`` works offline."""
    return str(Path(__file__).with_name("caption_metrics"))


__all__ = [
    "METRIC_NAMES",
    "CiderD",
    "cider_d_corpus",
    "compute_caption_metrics",
    "evaluate_module_path",
    "format_metrics_table",
    "ptb_tokenize",
    "simple_tokenize",
    "spice_jars",
]
