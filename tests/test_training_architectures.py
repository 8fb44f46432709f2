"""M² and ExpansionNet v2 through the trainer on the scenes dataset, with the stage shapes of their authors' recipes:
ExpansionNet v2's XE on cached backbone features, then end to end, then SCST on cached features; M² from pixels
with XE then beam-SCST (the beam-mean baseline over the authors' own beam search, through the stage's generate
kwargs); M² on bottom-up region features imported from an HDF5 file in the authors' layout. Each run's validation
CIDEr-D must rise above its first value."""

import json

import numpy as np
import pytest
import yaml

from hfcap.cli import main
from hfcap.data import load_scenes

TINY_EXPANSIONNET = {
    "backbone": "swin_tiny_patch4_window7_224",
    "backbone_kwargs": {"img_size": 32, "embed_dim": 8, "depths": [2, 1], "num_heads": [1, 2], "window_size": 4},
    "visual_feature_dim": 16, "d_model": 32, "num_heads": 2, "d_ff": 64, "num_encoder_layers": 2,
    "num_decoder_layers": 2, "static_expansion_groups": [2, 4], "num_dynamic_expansions": 3,
    "max_position_embeddings": 40,
}
TINY_M2 = {"backbone": "test_resnet", "visual_feature_dim": 96, "d_model": 32, "num_heads": 2, "head_dim": 16,
           "d_ff": 64, "num_memory_slots": 4, "num_encoder_layers": 2, "num_decoder_layers": 2,
           "max_position_embeddings": 40, "dropout": 0.0}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenes")
    load_scenes(folder, num_train=80, num_val=8, num_test=8, image_size=32, num_workers=1)
    return folder


def run(tmp_path, scenes, model, stages, **top) -> dict:
    config = {
        "output_dir": str(tmp_path / "run"), "num_threads": 1, "report_to": [], "attention_maps": 1,
        "data": {"name": "scenes", "num_train": 80, "num_val": 8, "num_test": 8, "scenes_image_size": 32,
                 "cache_dir": str(scenes), "xe_captions": "grouped"},
        "processor": {"image_size": 32, "min_word_frequency": 1, "max_caption_length": 30},
        "model": model, "stages": stages, "validate_every_steps": 20, "log_every_steps": 10,
        "validation": {"num_beams": 1, "max_new_tokens": 12},
        "test": {"num_beams": 2, "max_new_tokens": 12, "full_metrics": False},
        **top,
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(tmp_path / "config.yaml")]) == 0
    return json.loads((tmp_path / "run" / "metrics.json").read_text())


def validation_scores(tmp_path) -> list[float]:
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    return [record["val_CIDEr-D"] for record in records if "val_CIDEr-D" in record]


def test_expansionnet_v2_recipe_shape_on_scenes(tmp_path, scenes):
    stages = [
        {"name": "xe_partial", "type": "xe", "cached_features": True, "epochs": 10, "batch_size": 8, "lr": 5e-3,
         "optimizer": "radam", "betas": [0.9, 0.98], "label_smoothing": 0.1},
        {"name": "xe_end_to_end", "type": "xe", "max_steps": 3, "batch_size": 8, "lr": 1e-3},
        {"name": "scst_partial", "type": "scst", "cached_features": True, "max_steps": 2, "batch_size": 4,
         "num_samples": 3, "max_new_tokens": 12, "lr": 1e-4, "normalisation": "sequence"},
    ]
    metrics = run(tmp_path, scenes, {"type": "expansionnet-v2", "config": TINY_EXPANSIONNET}, stages)
    assert list(metrics["table"]) == ["baseline (most frequent caption)", "xe_partial", "xe_end_to_end",
                                      "scst_partial"]
    scores = validation_scores(tmp_path)
    assert max(scores) > scores[0] + 0.2, scores  # CIDEr-D rose by more than 20 points (x100)
    for stage in ("xe_partial", "scst_partial"):  # Swin's final 4x4 map of width 16, cached once per stage
        index = json.loads((tmp_path / "run" / "features" / stage / "features.json").read_text())
        assert (index["num_images"], index["num_positions"], index["dim"]) == (80, 16, 16)
    assert len(list((tmp_path / "run" / "attention").glob("*.png"))) == 1  # 16 positions drawn as a 4x4 grid


def test_m2_from_pixels_with_beam_scst_through_the_authors_search(tmp_path, scenes):
    stages = [
        {"name": "xe", "type": "xe", "epochs": 8, "batch_size": 8, "lr": 5e-3},
        {"name": "scst", "type": "scst", "max_steps": 2, "batch_size": 4, "lr": 1e-5, "baseline": "beam_mean",
         "num_samples": 3, "include_eos": False, "df_mode": "per_caption", "normalisation": "max_length",
         "max_new_tokens": 12, "reference_beam_search": True, "init_from_best": True},
    ]
    metrics = run(tmp_path, scenes, {"type": "m2_transformer", "config": TINY_M2}, stages,
                  test={"num_beams": 3, "max_new_tokens": 12, "full_metrics": False, "reference_beam_search": True})
    scores = validation_scores(tmp_path)
    assert max(scores) > scores[0] + 0.2, scores
    assert metrics["generate_kwargs"]["custom_generate"] == "reference_beam_search"
    scst_records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any(record.get("stage") == "scst" and "reward" in record for record in scst_records)


def test_m2_on_region_features_imported_from_hdf5(tmp_path, scenes, capsys):
    """`hfcap data regions` reads `<image_id>_features` (N_i, D) datasets, keeps the first --max-regions rows; the
    trainer and `hfcap evaluate` read the cache instead of the images, padding variable N with masks."""
    import h5py

    splits = load_scenes(scenes, num_train=80, num_val=8, num_test=8, image_size=32, num_workers=1)
    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "detections.hdf5", "w") as detections:
        for split in splits.values():
            for image_id in split["image_id"]:
                detections[f"{image_id}_features"] = rng.random((int(rng.integers(3, 9)), 12), dtype=np.float32)
    data_flags = ["--scenes-dir", str(scenes), "--scenes-sizes", "80", "8", "8", "--scenes-image-size", "32"]
    assert main(["data", "regions", "--hdf5", str(tmp_path / "detections.hdf5"), "--output",
                 str(tmp_path / "regions"), "--max-regions", "6", *data_flags]) == 0
    index = json.loads((tmp_path / "regions" / "features.json").read_text())
    assert (index["num_images"], index["num_positions"], index["dim"]) == (96, 6, 12)

    config = {**TINY_M2, "use_backbone": False, "visual_feature_dim": 12}
    stages = [{"name": "xe", "type": "xe", "epochs": 4, "batch_size": 8, "lr": 3e-3}]
    run(tmp_path, scenes, {"type": "m2-transformer", "config": config}, stages,
        data={"name": "scenes", "num_train": 80, "num_val": 8, "num_test": 8, "scenes_image_size": 32,
              "cache_dir": str(scenes), "visual_features_dir": str(tmp_path / "regions")})
    scores = validation_scores(tmp_path)
    assert len(scores) > 1 and np.isfinite(scores).all()  # random regions carry no image content: no rise expected
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tmp_path / "run" / "model"), "--output", str(tmp_path / "eval"),
                 "--visual-features", str(tmp_path / "regions"), "--cider-only", "--max-new-tokens", "8",
                 "--remove-consecutive-duplicates", *data_flags]) == 0
    results = json.loads((tmp_path / "eval" / "captions_test_results.json").read_text())
    assert len(results) == 8
    for result in results:  # the authors' post-processing: no word repeated right after itself
        words = result["caption"].split()
        assert all(first != second for first, second in zip(words, words[1:])), result
    summary = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert summary["postprocessing"] == "remove_consecutive_duplicate_words"
