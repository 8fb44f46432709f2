"""Feature cache: training on cached backbone-stage features equals training with the frozen backbone run every step,
for a model without encoder layers (Show-Attend-Tell) and one whose encoder has trainable layers after the backbone
(ExpansionNet v2: a projection and static-expansion layers, with dropout)."""

import copy

import numpy as np
import pytest
import torch
from conftest import TRAIN_CAPTIONS, tiny_sat
from PIL import Image
from safetensors import safe_open

from hfcap.models.expansionnet_v2 import ExpansionNetV2Config, ExpansionNetV2ForConditionalGeneration
from hfcap.training.feature_cache import CachedFeatureDataset, cache_visual_features
from hfcap.training.freezing import freeze_backbone

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


def tiny_expansionnet(dropout=0.0):
    """`(model, processor)`: a random ExpansionNet v2 on a 32 px two-stage Swin (16 tokens of width 16) with a
    2-layer static-expansion encoder, over the words of `TRAIN_CAPTIONS`."""
    _, processor = tiny_sat()
    tokenizer = processor.tokenizer
    config = ExpansionNetV2Config(
        backbone="swin_tiny_patch4_window7_224",
        backbone_kwargs={"img_size": 32, "embed_dim": 8, "depths": [2, 1], "num_heads": [1, 2], "window_size": 4},
        visual_feature_dim=16, vocab_size=len(tokenizer), d_model=16, num_heads=2, d_ff=32, num_encoder_layers=2,
        num_decoder_layers=2, static_expansion_groups=[2, 4], num_dynamic_expansions=3, max_position_embeddings=16,
        dropout_enc=dropout, dropout_dec=dropout, dropout_enc_input=dropout, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    return ExpansionNetV2ForConditionalGeneration(config), processor


MODELS = {"show_attend_tell": tiny_sat, "expansionnet_v2": tiny_expansionnet}


def _train(model, processor, dataset, batches, visual_features=None):
    """Adam steps on the first caption of each image; with ``visual_features`` (image_id -> (N, D)) instead of pixels.
    The frozen backbone runs in eval mode, as when its features were cached; the encoder's layers train."""
    freeze_backbone(model, 0)
    model.train()
    model.backbone.eval()
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


@pytest.mark.parametrize("architecture,dtype,tolerance", [
    ("show_attend_tell", torch.float32, 1e-6),
    ("show_attend_tell", torch.float16, 3e-3),  # fp16 storage: Adam amplifies rounding in deeper models
    ("expansionnet_v2", torch.float32, 1e-6),
])
def test_training_from_cache_equals_frozen_backbone(images, tmp_path, architecture, dtype, tolerance):
    model, processor = MODELS[architecture](dropout=0.3)
    reference = copy.deepcopy(model)
    path = cache_visual_features(model, processor, images, tmp_path / "cache", batch_size=4, dtype=dtype, shard_size=4)
    assert sorted(p.name for p in path.iterdir()) == ["features-00000.safetensors", "features-00001.safetensors",
                                                        "features.json"]
    with safe_open(str(path / "features-00000.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("visual_features").dtype == dtype
        expected_shape = {"show_attend_tell": (4, 4, 96), "expansionnet_v2": (4, 16, 16)}[architecture]
        assert handle.get_tensor("visual_features").shape == expected_shape  # a shard of 4 images: (4, N, D)
        assert handle.get_tensor("image_id").tolist() == [100, 101, 102, 103]
        with torch.no_grad():  # what is cached is the backbone stage's output, not the encoder's
            torch.testing.assert_close(handle.get_tensor("visual_features").float(), model.eval().get_image_features(
                processor(images=list(images.select(range(4))["image"]))["pixel_values"]), atol=tolerance, rtol=0)
    cached = CachedFeatureDataset(path)
    features = {item["image_id"]: item["visual_features"] for item in cached}
    assert len(cached) == NUM_IMAGES and all(f.dtype == torch.float32 for f in features.values())

    trained_from_pixels = _train(reference, processor, images, BATCHES)
    trained_from_cache = _train(model, processor, images, BATCHES, visual_features=features)
    pixel_params = dict(trained_from_pixels.named_parameters())
    difference = max((p - pixel_params[n]).abs().max().item() for n, p in trained_from_cache.named_parameters())
    assert difference <= tolerance, f"max |parameter difference| {difference:.3g}"
    untrained = dict(MODELS[architecture]()[0].named_parameters())
    moved = {name: (parameter - untrained[name]).abs().max().item()
             for name, parameter in trained_from_cache.named_parameters()}
    assert max(moved.values()) > 0.03  # training did change the weights (5 Adam steps of 1e-2) ...
    assert all(moved[name] == 0 for name in moved if name.startswith("encoder.backbone."))  # ... not the backbone's
    if architecture == "expansionnet_v2":  # and the encoder's own layers trained from the cached features
        assert max(value for name, value in moved.items() if name.startswith("encoder.layers.")) > 0.01


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


def test_cache_errors(images, tmp_path):
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
