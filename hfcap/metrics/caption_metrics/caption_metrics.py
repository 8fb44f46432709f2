"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE) as a local 🤗 evaluate module.

Load it offline from the installed package: ``evaluate.load(hfcap.metrics.evaluate_module_path())``.
"""

import datasets
import evaluate

from hfcap.metrics.coco import compute_caption_metrics

_DESCRIPTION = """\
The COCO caption evaluation protocol of pycocoevalcap, run offline: Stanford PTB tokenisation, then corpus-level
BLEU-1..4, METEOR, ROUGE-L and CIDEr-D, plus SPICE when its Stanford CoreNLP 3.6.0 jars are installed.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions: one generated caption (string) per image.
    references: the reference captions (list of strings) of each image.
    spice: "auto" (default: only if the CoreNLP jars are present), True (required) or False.
    meteor: False skips METEOR (whose first use starts a JVM, ~10 s).
Returns:
    dict with "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D" (and "SPICE") as fractions;
    CIDEr-D on its x10 scale (1.2 for the "120" of papers).
Example:
    >>> metric = evaluate.load(hfcap.metrics.evaluate_module_path())
    >>> metric.compute(predictions=["a dog on a beach"], references=[["a dog runs on the beach", "a brown dog"]])
"""

_CITATION = """\
@article{chen2015microsoft,
  title={Microsoft COCO Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh
          and Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  journal={arXiv preprint arXiv:1504.00325},
  year={2015}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CaptionMetrics(evaluate.Metric):
    """COCO caption metrics of hfcap (see ``hfcap.metrics.compute_caption_metrics``)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
            codebase_urls=["https://github.com/salaniz/pycocoevalcap"],
        )

    def _compute(self, predictions, references, spice="auto", meteor=True) -> dict:
        return compute_caption_metrics(
            dict(enumerate(predictions)), dict(enumerate(references)), spice=spice, meteor=meteor
        )
