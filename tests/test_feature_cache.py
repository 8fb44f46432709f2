"""Feature cache: training on cached backbone features equals training with the frozen backbone run every step."""

import copy

import numpy as np
import pytest
import torch
from conftest import TRAIN_CAPTIONS, tiny_sat
from PIL import Image
from safetensors import safe_open

from hfcap.training.feature_cache import CachedFeatureDataset, cache_visual_features

NUM_IMAGES = 6


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A per-image ``datasets.Dataset`` (image, captions, image_id) of 6 random 32 px images."""
    from datasets import Dataset
    from datasets import Image as ImageFeature

    root = tmp_path_factory.mktemp("feature_cache")
    rng = np.random.default_rng(0)
    paths = []
    for index in range(NUM_IMAGES):
        paths.append(str(root / f"img{index}.png"))
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(paths[-1])
    captions = [TRAIN_CAPTIONS[i % len(TRAIN_CAPTIONS)] for i in range(NUM_IMAGES)]
    image_ids = [100 + i for i in range(NUM_IMAGES)]
    dataset = Dataset.from_dict({"image": paths, "captions": captions, "image_id": image_ids})
    return dataset.cast_column("image", ImageFeature())


def _train(model, processor, dataset, batches, visual_features=None):
    """Adam steps on the first caption of each image; with ``visual_features`` (image_id -> (N, D)) instead of pixels.
    The frozen backbone runs in eval mode, as when its features were cached."""
    model.train()
    model.encoder.eval()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step, rows in enumerate(batches):
        batch = dataset.select(rows)
        labels = processor(text_target=[caps[0] for caps in batch["captions"]])["labels"]
        if visual_features is None:
            inputs = {"pixel_values": processor(images=list(batch["image"]))["pixel_values"]}
        else:
            inputs = {"visual_features": torch.stack([visual_features[int(i)] for i in batch["image_id"]])}
        torch.manual_seed(step)  # same dropout masks in both runs
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


BATCHES = [[0, 1], [2, 3], [4, 5], [5, 0], [1, 3]]


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.float16, 3e-3)])
def test_training_from_cache_equals_frozen_backbone(images, tmp_path, dtype, tolerance):
    model, processor = tiny_sat(dropout=0.3)
    reference = copy.deepcopy(model)
    path = cache_visual_features(model, processor, images, tmp_path / "cache", batch_size=4, dtype=dtype, shard_size=4)
    assert sorted(p.name for p in path.iterdir()) == ["features-00000.safetensors", "features-00001.safetensors",
                                                        "features.json"]
    with safe_open(str(path / "features-00000.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("visual_features").dtype == dtype
        assert handle.get_tensor("visual_features").shape == (4, 4, 96)  # shard of 4 images, N = 2x2, D = 96
        assert handle.get_tensor("image_id").tolist() == [100, 101, 102, 103]
    cached = CachedFeatureDataset(path)
    features = {item["image_id"]: item["visual_features"] for item in cached}
    assert len(cached) == NUM_IMAGES and all(f.dtype == torch.float32 for f in features.values())

    trained_from_pixels = _train(reference, processor, images, BATCHES)
    trained_from_cache = _train(model, processor, images, BATCHES, visual_features=features)
    pixel_params = dict(trained_from_pixels.named_parameters())
    difference = max((p - pixel_params[n]).abs().max().item() for n, p in trained_from_cache.named_parameters())
    assert difference <= tolerance, f"max |parameter difference| {difference:.3g}"
    moved = (trained_from_cache.decoder.fc.weight - tiny_sat()[0].decoder.fc.weight).abs().max()
    assert moved > 0.03  # training did change the weights (5 Adam steps of 1e-2)


def test_cached_features_replay_and_pixels_still_work(images, tmp_path):
    """Per-caption rows join their image's features; the same model keeps generating from pixels identically."""
    model, processor = tiny_sat()
    path = cache_visual_features(model, processor, images, tmp_path / "cache", batch_size=4)
    per_caption = images.select([0, 0, 3, 5])  # e.g. one row per (image, caption) pair
    joined = CachedFeatureDataset(path, per_caption)
    assert len(joined) == 4 and "image" not in joined[0]
    assert [item["image_id"] for item in joined] == [100, 100, 103, 105]
    assert joined[1]["captions"] == TRAIN_CAPTIONS[0]
    model.eval()
    pixel_values = processor(images=list(images.select([3, 5])["image"]))["pixel_values"]
    from_pixels = model.generate(pixel_values=pixel_values, num_beams=2, max_new_tokens=6)
    cached = torch.stack([joined[2]["visual_features"], joined[3]["visual_features"]])
    from_cache = model.generate(visual_features=cached, num_beams=2, max_new_tokens=6)
    assert torch.equal(from_pixels, from_cache)


def test_cache_errors(images, tmp_path, monkeypatch):
    model, processor = tiny_sat()
    with pytest.raises(FileNotFoundError, match="features.json missing"):
        CachedFeatureDataset(tmp_path / "nothing")
    path = cache_visual_features(model, processor, images.select([0, 1]), tmp_path / "small", batch_size=2)
    with pytest.raises(KeyError, match="2 image ids of the dataset are not in the feature cache"):
        CachedFeatureDataset(path, images.select([0, 2, 3]))
    with pytest.raises(ValueError, match="duplicate image_id"):
        cache_visual_features(model, processor, images.select([0, 0]), tmp_path / "dup")
    with pytest.raises(ValueError, match="dtype must be"):
        cache_visual_features(model, processor, images, tmp_path / "int", dtype=torch.int8)

    encoder = model.get_encoder()

    def transforming_encoder(pixel_values=None, visual_features=None):
        output = encoder(pixel_values=pixel_values, visual_features=visual_features)
        output.last_hidden_state = output.last_hidden_state * 2  # e.g. a trainable projection
        return output

    monkeypatch.setattr(model, "get_encoder", lambda: transforming_encoder)
    with pytest.raises(ValueError, match="transforms visual_features"):
        cache_visual_features(model, processor, images, tmp_path / "transformed")
