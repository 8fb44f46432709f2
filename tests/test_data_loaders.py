"""Karpathy / COCO / folder loaders on small files written here in exactly those formats, plus ``hfcap data``."""

import json
import logging

import pytest
from PIL import Image

import hfcap.cli
from hfcap.data import load_caption_folder, load_coco_captions, load_karpathy

# Each image gets its own colour, so a test can check that a row's image is the file its record names.
PALETTE = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200), (200, 0, 200)]


def make_image(path, color, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path, format=fmt)


def pixel(row):
    return row["image"].convert("RGB").getpixel((3, 3))


def karpathy_entry(filename, split, imgid, captions, filepath=None, cocoid=None):
    entry = {"filename": filename, "split": split, "imgid": imgid, "sentids": list(range(len(captions))),
             "sentences": [{"raw": c, "tokens": c.lower().split(), "imgid": imgid, "sentid": k}
                           for k, c in enumerate(captions)]}
    if filepath is not None:
        entry["filepath"] = filepath
    if cocoid is not None:
        entry["cocoid"] = cocoid
    return entry


@pytest.fixture
def karpathy_coco(tmp_path):
    """dataset_coco.json style: filepath + cocoid, all four splits."""
    images = []
    for k, (folder, split) in enumerate([("train2014", "train"), ("val2014", "restval"), ("val2014", "val"),
                                         ("val2014", "test"), ("train2014", "train")]):
        name = f"COCO_{folder}_{k:012d}.jpg"
        make_image(tmp_path / "coco" / folder / name, PALETTE[k], "JPEG")
        images.append(karpathy_entry(name, split, k, [f"caption {k} one.", f"Caption {k} two"], folder, 1000 + k))
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path, tmp_path / "coco"


def test_karpathy_with_filepath_and_cocoid_merges_restval(karpathy_coco):
    path, root = karpathy_coco
    splits = load_karpathy(path, root)
    assert list(splits) == ["train", "val", "test"]
    assert splits["train"]["image_id"] == [1000, 1001, 1004]
    assert splits["val"]["image_id"] == [1002] and splits["test"]["image_id"] == [1003]
    row = splits["train"][1]
    assert row["captions"] == ["caption 1 one.", "Caption 1 two"]
    assert [abs(a - b) < 12 for a, b in zip(pixel(row), PALETTE[1])] == [True] * 3  # JPEG: approximately
    assert str(splits["train"].features["image_id"].dtype) == "int64"


def test_karpathy_keeps_restval_when_asked(karpathy_coco):
    splits = load_karpathy(*karpathy_coco, merge_restval=False)
    assert list(splits) == ["train", "val", "test", "restval"]
    assert splits["train"]["image_id"] == [1000, 1004] and splits["restval"]["image_id"] == [1001]


def test_karpathy_without_filepath_uses_imgid(tmp_path):
    images = []
    for k, split in enumerate(["train", "train", "val", "test"]):
        make_image(tmp_path / "Flicker8k_Dataset" / f"{k}_abc.jpg", PALETTE[k])
        images.append(karpathy_entry(f"{k}_abc.jpg", split, 10 + k, [f"a dog {k}", "a cat", "a bird"]))
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": images, "dataset": "flickr8k"}))
    splits = load_karpathy(tmp_path / "dataset_flickr8k.json", tmp_path / "Flicker8k_Dataset")
    assert splits["train"]["image_id"] == [10, 11] and splits["test"]["image_id"] == [13]
    assert pixel(splits["train"][1]) == PALETTE[1] and splits["val"][0]["captions"] == ["a dog 2", "a cat", "a bird"]


@pytest.fixture
def bad_karpathy(tmp_path):
    good = [karpathy_entry(f"{k}.png", "train", k, ["a caption"]) for k in range(5)]
    for k in range(5):
        make_image(tmp_path / f"{k}.png", PALETTE[k])
    del good[1]["sentences"]
    (tmp_path / "2.png").unlink()
    good[3]["sentences"] = []
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"images": good}))
    return path, tmp_path


@pytest.mark.parametrize(
    "broken, message",
    [(1, r"record 1 \(1\.png\): missing key 'sentences'"),
     (2, r"record 2 \(2\.png\): image file not found: .*2\.png"),
     (3, r"record 3 \(3\.png\): no captions")],
)
def test_bad_records_raise_naming_the_record(bad_karpathy, broken, message):
    path, root = bad_karpathy
    data = json.loads(path.read_text())
    if broken != 1:
        data["images"][1]["sentences"] = [{"raw": "fixed"}]
    if broken != 2:
        make_image(root / "2.png", PALETTE[2])
    if broken != 3:
        data["images"][3]["sentences"] = [{"raw": "fixed"}]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        load_karpathy(path, root)


def test_skip_bad_records_counts_them(bad_karpathy, caplog):
    with caplog.at_level(logging.WARNING, logger="hfcap.data.loaders"):
        splits = load_karpathy(*bad_karpathy, skip_bad_records=True)
    assert splits["train"]["image_id"] == [0, 4]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "Skipped 3 bad record(s)" in warning and "missing key 'sentences'" in warning and "no captions" in warning


def coco_file(tmp_path, annotations):
    images = [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "height": 6, "width": 8},
              {"id": 7, "file_name": "COCO_val2014_000000000007.jpg", "height": 6, "width": 8}]
    for k, image in enumerate(images):
        make_image(tmp_path / "val2014" / image["file_name"], PALETTE[k], "JPEG")
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations}))
    return path, tmp_path / "val2014"


def test_coco_groups_captions_per_image_in_annotation_order(tmp_path):
    annotations = [{"image_id": 7, "id": 1, "caption": "B first"}, {"image_id": 42, "id": 2, "caption": "A first"},
                   {"image_id": 7, "id": 3, "caption": "B second"}, {"image_id": 42, "id": 9, "caption": "A second"}]
    dataset = load_coco_captions(*coco_file(tmp_path, annotations))
    assert dataset["image_id"] == [42, 7]
    assert dataset["captions"] == [["A first", "A second"], ["B first", "B second"]]
    assert [abs(a - b) < 12 for a, b in zip(pixel(dataset[1]), PALETTE[1])] == [True] * 3


def test_coco_bad_records(tmp_path, caplog):
    annotations = [{"image_id": 42, "id": 1, "caption": "fine"}, {"image_id": 99, "id": 5, "caption": "orphan"},
                   {"image_id": 42, "id": 6}]
    path, images_dir = coco_file(tmp_path, annotations)
    with pytest.raises(ValueError, match=r"annotation id 5\): image_id 99 is not in 'images'"):
        load_coco_captions(path, images_dir)
    with caplog.at_level(logging.WARNING, logger="hfcap.data.loaders"):
        dataset = load_coco_captions(path, images_dir, skip_bad_records=True)
    assert dataset["image_id"] == [42] and dataset["captions"] == [["fine"]]
    warnings = " | ".join(r.getMessage() for r in caplog.records)
    assert "Skipped 2 bad record(s)" in warnings and "missing key 'caption'" in warnings
    assert "Skipped 1 bad record(s)" in warnings and "COCO_val2014_000000000007.jpg): no captions" in warnings


def test_folder_jsonl_with_splits(tmp_path):
    rows = [{"file_name": "imgs/a.png", "captions": ["red", "a red image"], "split": "train"},
            {"file_name": "imgs/b.jpg", "captions": ["green"], "split": "validation"},
            {"file_name": "imgs/c.png", "captions": ["blue"], "split": "train", "image_id": 77}]
    for k, row in enumerate(rows):
        make_image(tmp_path / row["file_name"], PALETTE[k], "JPEG" if row["file_name"].endswith("jpg") else "PNG")
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    splits = load_caption_folder(tmp_path)
    assert list(splits) == ["train", "validation"]
    assert splits["train"]["image_id"] == [0, 77] and splits["train"]["captions"] == [["red", "a red image"], ["blue"]]
    assert pixel(splits["train"][1]) == PALETTE[2] and splits["validation"]["captions"] == [["green"]]


def test_folder_csv_json_list_or_pipe_separated(tmp_path):
    for k in range(2):
        make_image(tmp_path / f"{k}.png", PALETTE[k])
    (tmp_path / "metadata.csv").write_text(
        'file_name,captions\n0.png,"[""a red box"", ""red, square""]"\n1.png,a green one| green square \n')
    splits = load_caption_folder(tmp_path)
    assert list(splits) == ["train"]
    assert splits["train"]["captions"] == [["a red box", "red, square"], ["a green one", "green square"]]


def test_folder_bad_records(tmp_path, caplog):
    make_image(tmp_path / "0.png", PALETTE[0])
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "0.png", "captions": ["ok"]}\n{"file_name": "gone.png", "captions": ["x"]}\n'
        '{"file_name": "0.png", "captions": []}\n{"captions": ["no file name"]}\n')
    with pytest.raises(ValueError, match=r"record 1 \(gone\.png\): image file not found"):
        load_caption_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="hfcap.data.loaders"):
        splits = load_caption_folder(tmp_path, skip_bad_records=True)
    assert splits["train"]["captions"] == [["ok"]]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "Skipped 3 bad record(s)" in warning and "record 3 (?): missing key 'file_name'" in warning


def run_cli(monkeypatch, argv):
    # Only the `data` subcommand: this file tests it, not the other helpers' modules.
    monkeypatch.setattr(hfcap.cli, "SUBCOMMANDS", {"data": hfcap.cli.SUBCOMMANDS["data"]})
    return hfcap.cli.main(argv)


def test_cli_inspect_karpathy(karpathy_coco, monkeypatch, capsys):
    path, root = karpathy_coco
    argv = ["data", "inspect", "--data", "karpathy", "--karpathy-json", str(path), "--images-root"]
    assert run_cli(monkeypatch, [*argv, str(root)]) == 0
    out = capsys.readouterr().out
    assert "train: 3 images, 6 captions" in out and "val: 1 images" in out and "caption 4 one." in out
    assert run_cli(monkeypatch, [*argv, str(root / "x")]) == 2  # an invalid dataset record
    assert "image file not found" in capsys.readouterr().err
    assert run_cli(monkeypatch, ["data", "inspect", "--data", "karpathy"]) == 2
    assert "--data karpathy needs --karpathy-json and --images-root" in capsys.readouterr().err


def test_cli_scenes(tmp_path, monkeypatch, capsys):
    argv = ["data", "scenes", "--output", str(tmp_path), "--train", "4", "--val", "1", "--test", "1",
            "--image-size", "64", "--seed", "5"]
    assert run_cli(monkeypatch, argv) == 0
    out = capsys.readouterr().out
    assert f"Wrote 6 scenes (train 4, val 1, test 1) to {tmp_path}" in out
    assert len(list((tmp_path / "train").glob("*.png"))) == 4
    examples = [line for line in out.splitlines() if line.startswith("  train/")]
    first_captions = [image["sentences"][0]["raw"] for image in
                      json.loads((tmp_path / "dataset_scenes.json").read_text())["images"][:3]]
    assert [line.split(": ", 1)[1] for line in examples] == first_captions
