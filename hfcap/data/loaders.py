"""Caption dataset loaders: Karpathy splits, official COCO caption annotations, and a folder of images + metadata.

Every loader returns ``datasets`` objects with the same three columns:

- ``image``: ``datasets.Image()`` (stored as a path, decoded to PIL on access);
- ``captions``: ``list[str]``, the raw reference sentences;
- ``image_id``: ``int64``.

Records are validated while loading (required keys, image file exists, at least one non-empty caption) with cheap
checks only: images are not decoded. A bad record raises a ``ValueError`` naming the record (index, file name or
id) and the problem; with ``skip_bad_records=True`` bad records are dropped and a warning reports how many and why.
``datasets`` is imported lazily so that ``import hfcap`` works without it.
"""

import csv
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

KARPATHY_SPLITS = ("train", "restval", "val", "test")


class BadRecord(ValueError):
    """A record that fails validation; ``label`` names it, the message says what is wrong."""

    def __init__(self, label, problem):
        super().__init__(problem)
        self.label = label


def _features():
    from datasets import Features, Image, List, Value

    return Features({"image": Image(), "captions": List(Value("string")), "image_id": Value("int64")})


def _to_dataset(records):
    """``records``: dicts with ``image`` (a path), ``captions`` and ``image_id`` → ``datasets.Dataset``."""
    from datasets import Dataset

    columns = {name: [r[name] for r in records] for name in ("image", "captions", "image_id")}
    return Dataset.from_dict(columns, features=_features())


def _validated(raw_records, parse, source, skip_bad_records):
    """Run ``parse(index, raw)`` on every record; a ``BadRecord`` raises a ValueError or (skip mode) is counted."""
    records, problems = [], []
    for index, raw in enumerate(raw_records):
        try:
            records.append(parse(index, raw))
        except BadRecord as bad:
            message = f"{source}: record {index} ({bad.label}): {bad}"
            if not skip_bad_records:
                raise ValueError(message) from None
            problems.append(message)
    if problems:
        shown = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
        logger.warning("Skipped %d bad record(s) of %s: %s", len(problems), source, shown)
    return records


def _require(raw, key, label):
    if not isinstance(raw, dict):
        raise BadRecord(label, f"expected an object, got {type(raw).__name__}")
    if key not in raw:
        raise BadRecord(label, f"missing key {key!r}")
    return raw[key]


def _check_captions(captions, label):
    """A non-empty list of non-blank strings."""
    if not isinstance(captions, list):
        raise BadRecord(label, f"captions must be a list of strings, got {type(captions).__name__}")
    if not captions:
        raise BadRecord(label, "no captions (empty caption list)")
    for k, caption in enumerate(captions):
        if not isinstance(caption, str) or not caption.strip():
            raise BadRecord(label, f"caption {k} is empty or not a string: {caption!r}")
    return captions


def _check_image(path, label):
    if not path.is_file():
        raise BadRecord(label, f"image file not found: {path}")
    return str(path)


def _check_int(value, what, label):
    try:
        return int(value)
    except (TypeError, ValueError):
        raise BadRecord(label, f"{what} is not an integer: {value!r}") from None


def _read_json(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def _dataset_dict(split_records, required=()):
    """``{split: records}`` → ``DatasetDict``; ``required`` splits exist even when empty, train/val/test first."""
    from datasets import DatasetDict

    order = ["train", "val", "test"]
    names = sorted(set(split_records) | set(required), key=lambda s: (order.index(s) if s in order else 3, s))
    return DatasetDict({name: _to_dataset(split_records.get(name, [])) for name in names})


def load_karpathy(json_path, images_root, *, merge_restval=True, skip_bad_records=False):
    """Karpathy's ``dataset_{coco,flickr8k,flickr30k}.json`` → ``DatasetDict`` with train/val/test splits.

    Each ``images[]`` entry has ``filename``, optional ``filepath`` (image at ``images_root/filepath/filename``,
    else ``images_root/filename``), ``split`` (train|restval|val|test), ``sentences[].raw`` and ``imgid``
    (``image_id`` is ``cocoid`` when present, else ``imgid``). ``restval`` joins train unless ``merge_restval`` is
    False, in which case it is kept as its own split.
    """
    data = _read_json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_path} is not a Karpathy split file: expected a top-level 'images' list")
    images_root = Path(images_root)

    def parse(index, raw):
        label = raw.get("filename", "?") if isinstance(raw, dict) else "?"
        filename = _require(raw, "filename", label)
        split = _require(raw, "split", label)
        if split not in KARPATHY_SPLITS:
            raise BadRecord(label, f"unknown split {split!r} (expected one of {', '.join(KARPATHY_SPLITS)})")
        image_id = _check_int(raw["cocoid"] if "cocoid" in raw else _require(raw, "imgid", label), "image id", label)
        sentences = _require(raw, "sentences", label)
        if not isinstance(sentences, list):
            raise BadRecord(label, "'sentences' must be a list")
        if any(not isinstance(s, dict) or "raw" not in s for s in sentences):
            raise BadRecord(label, "a sentence has no 'raw' text")
        captions = _check_captions([s["raw"] for s in sentences], label)
        folder = images_root / raw["filepath"] if "filepath" in raw else images_root
        image = _check_image(folder / filename, label)
        if merge_restval and split == "restval":
            split = "train"
        return split, {"image": image, "captions": captions, "image_id": image_id}

    splits = {}
    for split, record in _validated(data["images"], parse, str(json_path), skip_bad_records):
        splits.setdefault(split, []).append(record)
    return _dataset_dict(splits, required=("train", "val", "test") + (() if merge_restval else ("restval",)))


def load_coco_captions(annotation_json, images_dir, *, skip_bad_records=False):
    """Official COCO ``captions_{train,val}{2014,2017}.json`` → ``Dataset``, one row per image (``images[]`` order).

    Captions are grouped per image in annotation order; an annotation that is malformed or points at an unknown
    image is a bad record, and so is an image without captions or whose file is missing from ``images_dir``.
    """
    data = _read_json(annotation_json)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{annotation_json} is not a COCO captions file: expected 'images' and 'annotations' lists")
    images_dir = Path(images_dir)
    known_ids = {image["id"] for image in data["images"] if isinstance(image, dict) and "id" in image}

    def parse_annotation(index, raw):
        label = f"annotation id {raw.get('id', '?')}" if isinstance(raw, dict) else "annotation"
        image_id = _require(raw, "image_id", label)
        caption = _require(raw, "caption", label)
        if image_id not in known_ids:
            raise BadRecord(label, f"image_id {image_id!r} is not in 'images'")
        if not isinstance(caption, str) or not caption.strip():
            raise BadRecord(label, f"caption is empty or not a string: {caption!r}")
        return image_id, caption

    source = str(annotation_json)
    captions = {}
    for image_id, caption in _validated(data["annotations"], parse_annotation, f"{source} annotations", skip_bad_records):
        captions.setdefault(image_id, []).append(caption)

    def parse_image(index, raw):
        label = raw.get("file_name", f"id {raw.get('id', '?')}") if isinstance(raw, dict) else "?"
        image_id = _check_int(_require(raw, "id", label), "id", label)
        image = _check_image(images_dir / _require(raw, "file_name", label), label)
        return {"image": image, "captions": _check_captions(captions.get(image_id, []), label), "image_id": image_id}

    return _to_dataset(_validated(data["images"], parse_image, f"{source} images", skip_bad_records))


def _read_metadata(root):
    """Rows of ``metadata.jsonl`` (one JSON object per line) or ``metadata.csv``, and the file's path."""
    jsonl, csv_path = root / "metadata.jsonl", root / "metadata.csv"
    if jsonl.is_file() and csv_path.is_file():
        raise ValueError(f"{root} has both metadata.jsonl and metadata.csv; keep one")
    if jsonl.is_file():
        rows = []
        for number, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    rows.append(BadRecord(f"line {number}", f"invalid JSON: {error}"))
        return rows, jsonl
    if csv_path.is_file():
        with csv_path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        for row in rows:
            if row.get("captions") is not None:
                row["captions"] = _split_csv_captions(row["captions"])
        return rows, csv_path
    raise FileNotFoundError(f"no metadata.jsonl or metadata.csv in {root}")


def _split_csv_captions(cell):
    """A CSV ``captions`` cell: a JSON list (``["a dog", "a cat"]``) when it starts with ``[``, else ``|``-separated."""
    cell = cell.strip()
    if cell.startswith("["):
        try:
            return json.loads(cell)
        except json.JSONDecodeError:
            return cell  # validation then reports that the captions are not a list
    return [c.strip() for c in cell.split("|") if c.strip()]


def load_caption_folder(root, *, skip_bad_records=False):
    """A folder of images plus ``metadata.jsonl`` or ``metadata.csv`` → ``DatasetDict``.

    Each row has ``file_name`` (relative to ``root``), ``captions`` and optionally ``split`` (default "train") and
    ``image_id`` (default: the row's index). In JSONL ``captions`` is a list of strings; in CSV it is a JSON list
    string (``["a dog", "a cat"]``) or ``|``-separated captions (``a dog|a cat``).
    """
    root = Path(root)
    rows, metadata_path = _read_metadata(root)

    def parse(index, raw):
        if isinstance(raw, BadRecord):
            raise raw
        label = raw.get("file_name", "?") if isinstance(raw, dict) else "?"
        image = _check_image(root / _require(raw, "file_name", label), label)
        captions = _check_captions(_require(raw, "captions", label), label)
        image_id = raw.get("image_id")
        image_id = index if image_id in (None, "") else _check_int(image_id, "image_id", label)
        split = raw.get("split") or "train"
        return split, {"image": image, "captions": captions, "image_id": image_id}

    splits = {}
    for split, record in _validated(rows, parse, str(metadata_path), skip_bad_records):
        splits.setdefault(split, []).append(record)
    return _dataset_dict(splits)
