"""The COCO caption evaluation protocol, offline: PTB tokenisation, BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (+ SPICE).

pycocoevalcap's scorers are called one by one (``COCOEvalCap.evaluate()`` builds ``Spice()`` first, which
downloads Stanford CoreNLP and so fails offline). Java runs the PTB tokenizer, METEOR and SPICE.

- PTBTokenizer: same command and punctuation filter as pycocoevalcap's, but its temporary file goes to a private
  temporary directory instead of the (possibly read-only) package directory.
- METEOR: one ``meteor-1.5.jar`` process is kept alive for the whole Python session (~10 s JVM + paraphrase
  table start-up, paid once).
- CIDEr-D: :func:`hfcap.metrics.cider.cider_d_corpus`, equal to pycocoevalcap's ``Cider`` (tested to 1e-9) and
  ~20x faster.
- SPICE: needs ``stanford-corenlp-3.6.0.jar`` and ``stanford-corenlp-3.6.0-models.jar`` in
  ``pycocoevalcap/spice/lib/`` (not shipped, no offline source; see :func:`spice_jars`). Run without ``-cache``,
  whose serializer breaks on Java >= 16.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

from .cider import cider_d_corpus

logger = logging.getLogger(__name__)

METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE")

_meteor = None  # the long-lived METEOR scorer


def _java(command: list[str], cwd: Path | None = None) -> str:
    """Run a Java command and return its stdout; a clear error when Java is missing or the command fails."""
    try:
        result = subprocess.run(["java", *command], cwd=cwd, capture_output=True, check=False)
    except FileNotFoundError as error:
        raise RuntimeError("COCO caption metrics need Java on PATH (e.g. `apt install default-jre`)") from error
    if result.returncode != 0:
        stderr = result.stderr.decode(errors="replace")[-2000:]
        raise RuntimeError(f"java {' '.join(command[:3])} ... failed:\n{stderr}")
    return result.stdout.decode()


def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """pycocoevalcap's ``PTBTokenizer().tokenize``: ``{id: [caption, ...]}`` -> ``{id: [tokenised caption, ...]}``.

    Stanford PTBTokenizer (lowercased, one caption per line), then pycocoevalcap's punctuation tokens removed.
    Takes plain strings instead of ``{"caption": ...}`` dicts.
    """
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    keys = [key for key, caps in captions.items() for _ in caps]
    text = "\n".join(caption.replace("\n", " ") for caps in captions.values() for caption in caps)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "captions.txt"
        path.write_bytes(text.encode())
        command = ["-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", str(path)]
        lines = _java(command).split("\n")
    if len(lines) != len(keys):
        raise RuntimeError(f"PTBTokenizer returned {len(lines)} lines for {len(keys)} captions")
    tokenized: dict[Hashable, list[str]] = {key: [] for key in captions}
    for key, line in zip(keys, lines):
        words = line.rstrip().split(" ")
        tokenized[key].append(" ".join(word for word in words if word not in ptbtokenizer.PUNCTUATIONS))
    return tokenized


def spice_jars() -> list[Path]:
    """The two Stanford CoreNLP 3.6.0 jars SPICE needs, where ``spice-1.0.jar``'s manifest expects them."""
    from pycocoevalcap import spice

    lib = Path(spice.__file__).parent / "lib"
    return [lib / "stanford-corenlp-3.6.0.jar", lib / "stanford-corenlp-3.6.0-models.jar"]


def _spice(gts: dict, res: dict) -> float:
    """Mean SPICE F-score, as pycocoevalcap's ``Spice`` but with private temporary files and no ``-cache``."""
    from pycocoevalcap import spice

    keys = sorted(gts, key=str)
    with tempfile.TemporaryDirectory() as directory:
        inputs, outputs = Path(directory) / "input.json", Path(directory) / "output.json"
        items = [{"image_id": i, "test": res[key][0], "refs": gts[key]} for i, key in enumerate(keys)]
        inputs.write_text(json.dumps(items))
        command = ["-jar", "-Xmx8G", "spice-1.0.jar", str(inputs), "-out", str(outputs), "-subset", "-silent"]
        _java(command, cwd=Path(spice.__file__).parent)
        results = json.loads(outputs.read_text())

    def f_score(item: dict) -> float:
        value = item["scores"]["All"]["f"]
        return float(value) if value is not None else math.nan

    return sum(map(f_score, results)) / len(results)


def _meteor_scorer():
    """The shared METEOR scorer, restarted if its Java process has exited."""
    global _meteor
    if _meteor is None or _meteor.meteor_p.poll() is not None:
        from pycocoevalcap.meteor.meteor import Meteor

        try:
            _meteor = Meteor()
        except FileNotFoundError as error:
            raise RuntimeError("METEOR needs Java on PATH (e.g. `apt install default-jre`)") from error
    return _meteor


def _validate(predictions: Mapping, references: Mapping) -> None:
    if not predictions:
        raise ValueError("no predictions to evaluate")
    if predictions.keys() != references.keys():
        missing, extra = set(predictions) - set(references), set(references) - set(predictions)
        raise ValueError(f"predictions and references must have the same ids; only in predictions: "
                         f"{sorted(missing, key=str)[:5]}, only in references: {sorted(extra, key=str)[:5]}")
    for key, prediction in predictions.items():
        if not isinstance(prediction, str):
            raise TypeError(f"predictions[{key!r}] must be a string, got {type(prediction).__name__}")
        refs = references[key]
        if isinstance(refs, str) or not refs or not all(isinstance(ref, str) for ref in refs):
            raise TypeError(f"references[{key!r}] must be a non-empty list of strings, got {refs!r:.80}")


def compute_caption_metrics(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    spice: bool | str = "auto",
    meteor: bool = True,
) -> dict[str, float]:
    """COCO caption metrics of one caption per image against its reference captions.

    Args:
        predictions: ``{image_id: caption}``.
        references: ``{image_id: [reference caption, ...]}``, same ids.
        spice: ``"auto"`` computes SPICE when its CoreNLP jars are present (:func:`spice_jars`) and otherwise
            logs one warning and leaves ``SPICE`` out of the result; ``True`` requires them; ``False`` skips it.
        meteor: ``False`` skips METEOR (its first use in a session starts a JVM, ~10 s).

    Returns:
        ``{"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"[, "SPICE"]}`` as fractions (CIDEr-D
        on its x10 scale, e.g. 1.2 for the "120" of papers), corpus-level as in pycocoevalcap.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge

    _validate(predictions, references)
    if spice not in (True, False, "auto"):
        raise ValueError(f"spice must be True, False or 'auto', got {spice!r}")
    missing_jars = [str(jar) for jar in spice_jars() if not jar.is_file()] if spice else []
    if spice is True and missing_jars:
        raise FileNotFoundError(f"SPICE needs Stanford CoreNLP 3.6.0: missing {missing_jars}")
    if spice == "auto" and missing_jars:
        logger.warning("SPICE skipped: Stanford CoreNLP 3.6.0 jars not found (%s)", ", ".join(missing_jars))
    # One tokenizer run (one JVM start) for references and predictions.
    captions = {("ref", key): refs for key, refs in references.items()}
    captions.update({("pred", key): [prediction] for key, prediction in predictions.items()})
    tokenized = ptb_tokenize(captions)
    gts = {key: tokenized[("ref", key)] for key in references}
    res = {key: tokenized[("pred", key)] for key in predictions}

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    metrics = {f"BLEU-{i + 1}": float(value) for i, value in enumerate(bleu)}
    if meteor:
        metrics["METEOR"] = float(_meteor_scorer().compute_score(gts, res)[0])
    metrics["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    keys = list(gts)
    metrics["CIDEr-D"] = cider_d_corpus([res[key][0] for key in keys], [gts[key] for key in keys])[0]
    if spice and not missing_jars:
        metrics["SPICE"] = _spice(gts, res)
    return metrics


def format_metrics_table(metrics: Mapping[str, Mapping[str, float | None]]) -> str:
    """Markdown table of named runs: one row per run, one column per metric, values x100 with one decimal.

    ``metrics`` is ``{run name: compute_caption_metrics(...)}``; a metric a run lacks shows as "-".
    """
    columns = [name for name in METRIC_NAMES if any(name in row for row in metrics.values())]
    columns += list(dict.fromkeys(name for row in metrics.values() for name in row if name not in columns))
    lines = ["| run | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for run, row in metrics.items():
        cells = [f"{100 * row[name]:.1f}" if row.get(name) is not None else "-" for name in columns]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
