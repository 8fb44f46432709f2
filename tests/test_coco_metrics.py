"""hfcap.metrics.coco (COCO caption protocol) and the evaluate module, against pycocoevalcap run here."""

import logging
import os
import socket

import pytest

pytest.importorskip("pycocoevalcap")
from pycocoevalcap.bleu.bleu import Bleu  # noqa: E402
from pycocoevalcap.cider.cider import Cider  # noqa: E402
from pycocoevalcap.rouge.rouge import Rouge  # noqa: E402
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # noqa: E402

from hfcap.metrics import (  # noqa: E402
    METRIC_NAMES,
    compute_caption_metrics,
    evaluate_module_path,
    format_metrics_table,
    ptb_tokenize,
    spice_jars,
)

REFERENCES = {
    101: ["A brown dog runs along the beach.", "A dog running on the sand near the water.",
          "The dog is playing at the beach."],
    102: ["A man riding a horse in a field.", "A person rides a brown horse.", "Man on horseback in an open field."],
    103: ["Two cats sleeping on a bed.", "Two kittens lie on a blanket.", "A pair of cats asleep on the bed."],
    104: ["A plate of pasta with tomato sauce.", "Spaghetti and sauce on a white plate.",
          "A dish of noodles with red sauce."],
    105: ["A red double-decker bus on a city street.", "A bus driving down the road in a city.",
          "A red bus in traffic."],
    106: ["A woman holding an umbrella in the rain.", "A lady with an umbrella walks in the rain.",
          "Person under an umbrella on a rainy day."],
}
PREDICTIONS = {
    101: "a dog running on the beach",
    102: "a man riding a brown horse",
    103: "two cats lying on a bed",
    104: "a plate of spaghetti with sauce",
    105: "a red bus on a street",
    106: "a woman with an umbrella in the rain",
}
EXPECTED_KEYS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"]


@pytest.fixture(scope="module")
def metrics_without_meteor():
    return compute_caption_metrics(PREDICTIONS, REFERENCES, meteor=False, spice=False)


def test_matches_pycocoevalcap(metrics_without_meteor, caplog):
    try:  # pycocoevalcap's own tokenizer writes its temporary file into the package directory
        gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in refs] for k, refs in REFERENCES.items()})
        res = PTBTokenizer().tokenize({k: [{"caption": p}] for k, p in PREDICTIONS.items()})
    except PermissionError:
        pytest.skip("pycocoevalcap's PTBTokenizer cannot write into its read-only package directory")
    assert ptb_tokenize(REFERENCES) == gts
    assert ptb_tokenize({k: [p] for k, p in PREDICTIONS.items()}) == res

    metrics = metrics_without_meteor
    assert list(metrics) == [key for key in EXPECTED_KEYS if key != "METEOR"]
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        assert metrics[f"BLEU-{n + 1}"] == pytest.approx(bleu[n], abs=1e-12)
    assert metrics["ROUGE-L"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-12)
    assert metrics["CIDEr-D"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-9)
    assert 0.3 < metrics["BLEU-1"] <= 1 and 0.5 < metrics["CIDEr-D"] < 10

    # spice="auto" without the CoreNLP jars: one warning line, no SPICE key.
    if all(jar.is_file() for jar in spice_jars()):
        pytest.skip("SPICE jars installed")
    with caplog.at_level(logging.WARNING, logger="hfcap.metrics.coco"):
        auto = compute_caption_metrics({k: PREDICTIONS[k] for k in (101, 102)}, {k: REFERENCES[k] for k in (101, 102)},
                                       meteor=False)
    assert "SPICE" not in auto
    assert [r.getMessage().count("\n") for r in caplog.records] == [0]
    assert "SPICE skipped" in caplog.records[0].getMessage()


def test_perfect_predictions_beat_shuffled_ones_with_meteor():
    perfect = {key: refs[0] for key, refs in REFERENCES.items()}
    keys = list(REFERENCES)
    shuffled = {key: REFERENCES[keys[(i + 1) % len(keys)]][0] for i, key in enumerate(keys)}
    good = compute_caption_metrics(perfect, REFERENCES, spice=False)
    bad = compute_caption_metrics(shuffled, REFERENCES, spice=False)
    assert list(good) == list(bad) == EXPECTED_KEYS
    for key in EXPECTED_KEYS:
        assert 0 <= bad[key] < good[key], key
        assert good[key] <= (10 if key == "CIDEr-D" else 1), key
    assert good["BLEU-4"] == pytest.approx(1.0, abs=1e-6)  # each prediction is one of its references
    assert 0.5 < good["METEOR"] <= 1 and bad["METEOR"] < 0.2


def test_evaluate_module_offline(metrics_without_meteor, monkeypatch):
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert os.path.isfile(os.path.join(evaluate_module_path(), "caption_metrics.py"))
    metric = evaluate.load(evaluate_module_path())
    got = metric.compute(predictions=list(PREDICTIONS.values()), references=list(REFERENCES.values()),
                         meteor=False, spice=False)
    assert got == metrics_without_meteor


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="same ids"):
        compute_caption_metrics({1: "a dog"}, {2: ["a dog"]}, meteor=False)
    with pytest.raises(TypeError, match="non-empty list of strings"):
        compute_caption_metrics({1: "a dog"}, {1: "a dog"}, meteor=False)
    with pytest.raises(TypeError, match="must be a string"):
        compute_caption_metrics({1: ["a dog"]}, {1: ["a dog"]}, meteor=False)
    with pytest.raises(ValueError, match="spice"):
        compute_caption_metrics({1: "a dog"}, {1: ["a dog"]}, spice="yes", meteor=False)
    if not all(jar.is_file() for jar in spice_jars()):
        with pytest.raises(FileNotFoundError, match="stanford-corenlp-3.6.0"):
            compute_caption_metrics({1: "a dog"}, {1: ["a dog"]}, spice=True, meteor=False)


def test_format_metrics_table():
    table = format_metrics_table({
        "XE": {"BLEU-4": 0.3456, "CIDEr-D": 1.0449, "METEOR": 0.25},
        "SCST": {"BLEU-4": 0.38, "CIDEr-D": 1.2, "METEOR": 0.271, "SPICE": None, "CLIPScore": 0.7},
    })
    assert table.splitlines() == [
        "| run | BLEU-4 | METEOR | CIDEr-D | SPICE | CLIPScore |",
        "|---|---:|---:|---:|---:|---:|",
        "| XE | 34.6 | 25.0 | 104.5 | - | - |",
        "| SCST | 38.0 | 27.1 | 120.0 | - | 70.0 |",
    ]
    assert METRIC_NAMES[:7] == tuple(EXPECTED_KEYS)
