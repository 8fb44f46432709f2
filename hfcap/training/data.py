"""The trainer's data: splits, the processor, the row datasets of each kind of stage, and the one collate.

    load_splits(config) -> DatasetDict                the config's data source, cut to its max_*_images limits
    build_processor(config, train_split)              init_from's processor, or a new one (vocabulary from train)
    caption_pairs / OneCaptionPerImage / Indexed      the rows an XE or SCST stage iterates over
    pad_visual_features(features) -> (B, N, D), (B, N) the one place variable-N features are padded and masked
    visual_inputs(rows, processor)                    pixel_values, or visual_features (+ visual_attention_mask)
    make_collate(processor, kind)                     collate_fn for "pairs" | "grouped" | "images" | "evaluation"
"""

import random
from collections import Counter
from pathlib import Path

import torch


def load_splits(config):
    """The ``DatasetDict`` (train, val[, test]) of ``config.data``, cut to the ``max_*_images`` limits."""
    from datasets import DatasetDict

    from hfcap.data.sources import load_data_source

    data = config.data
    splits = load_data_source(data)
    for split in ("train", "val"):
        if split not in splits or len(splits[split]) == 0:
            raise ValueError(f"the {data.name} dataset has no (or an empty) {split!r} split; "
                             f"splits: {dict(splits.num_rows)}")
    limits = {"train": data.max_train_images, "val": data.max_val_images, "test": data.max_test_images}
    return DatasetDict({name: split.select(range(min(limits[name], len(split))))
                        if limits.get(name) is not None else split
                        for name, split in splits.items() if name in limits})


def build_processor(config, train_split):
    """The processor of ``model.init_from`` if it has one, else a new one with a vocabulary from the train captions."""
    from hfcap.processing import CaptioningProcessor, build_word_level_tokenizer, make_image_processor

    if config.model.init_from and (Path(config.model.init_from) / "processor_config.json").is_file():
        return CaptioningProcessor.from_pretrained(config.model.init_from)
    captions = [caption for captions in train_split["captions"] for caption in captions]
    tokenizer = build_word_level_tokenizer(captions, min_frequency=config.processor.min_word_frequency)
    image_processor = make_image_processor(config.processor.image_size, resample=config.processor.resample)
    return CaptioningProcessor(image_processor, tokenizer, max_caption_length=config.processor.max_caption_length)


def caption_pairs(split):
    """One row per (image, caption) pair, via a batched ``map`` that never decodes the images (hf_stack §7)."""
    from datasets import Image

    def expand(batch):
        counts = [len(captions) for captions in batch["captions"]]
        return {"image": [image for image, n in zip(batch["image"], counts) for _ in range(n)],
                "image_id": [image_id for image_id, n in zip(batch["image_id"], counts) for _ in range(n)],
                "caption": [caption for captions in batch["captions"] for caption in captions]}

    pairs = split.cast_column("image", Image(decode=False)).map(
        expand, batched=True, remove_columns=split.column_names, desc="Expanding (image, caption) pairs")
    return pairs.cast_column("image", Image())


class OneCaptionPerImage(torch.utils.data.Dataset):
    """Each row (image) once per epoch with one of its ``captions`` as ``caption``, drawn from (seed, epoch, index):
    the same on every process and after a resume; the trainer calls ``set_epoch``."""

    def __init__(self, rows, seed: int):
        self.rows, self.seed, self.epoch = rows, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        row = dict(self.rows[index])
        captions = row.pop("captions")
        return {**row, "caption": random.Random(f"{self.seed}-{self.epoch}-{index}").choice(captions)}


class Indexed(torch.utils.data.Dataset):
    """Rows plus ``index``, their position (= the training-image index of the SCST reward's references)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return {**self.rows[index], "index": index}


def pad_visual_features(features, masks=None):
    """Stack per-image visual features `(N_i, D)` into `(B, N, D)`, N = max N_i, zero-padded, and the matching
    `visual_attention_mask (B, N)` (1 = real; an image's own mask `(N_i,)` in `masks` is kept). The one place
    variable-N features (M²'s <= 50 regions) are padded; the models mask the padding."""
    length = max(feature.shape[0] for feature in features)
    batch = features[0].new_zeros(len(features), length, features[0].shape[-1])
    mask = torch.zeros(len(features), length, dtype=torch.long)
    for row, feature in enumerate(features):
        batch[row, : feature.shape[0]] = feature
        mask[row, : feature.shape[0]] = 1 if masks is None else masks[row]
    return batch, mask


def visual_inputs(rows, processor) -> dict:
    """The model's visual inputs for `rows`: `pixel_values` from their `image`s, or their `visual_features` stacked,
    with a `visual_attention_mask` when the rows' numbers of positions differ or rows carry masks."""
    if "visual_features" not in rows[0]:
        return {"pixel_values": processor(images=[row["image"] for row in rows], return_tensors="pt")["pixel_values"]}
    features = [torch.as_tensor(row["visual_features"]) for row in rows]
    masks = [torch.as_tensor(row["visual_attention_mask"]) for row in rows] if "visual_attention_mask" in rows[0] else None
    if masks is None and len({feature.shape[0] for feature in features}) == 1:
        return {"visual_features": torch.stack(features)}
    batch, mask = pad_visual_features(features, masks)
    return {"visual_features": batch, "visual_attention_mask": mask}


def make_collate(processor, kind: str):
    """``collate_fn`` of the training and evaluation loaders; every kind starts from ``visual_inputs``.

    ``pairs``: rows (image|visual_features, caption) → + labels.
    ``grouped``: rows (image|visual_features, captions) → one image per row plus ``caption_counts`` (B,) and the
    labels of all captions (Σ counts rows): the image is encoded once and its features repeated per caption.
    ``images``: rows (image|visual_features, index) → + image_index (SCST: the row of the reward's references).
    ``evaluation``: rows (image|visual_features, image_id) → + image_id.
    """

    def collate(rows):
        batch = visual_inputs(rows, processor)
        if kind == "pairs":
            batch["labels"] = processor(text_target=[row["caption"] for row in rows], return_tensors="pt")["labels"]
        elif kind == "grouped":
            captions = [caption for row in rows for caption in row["captions"]]
            batch["labels"] = processor(text_target=captions, return_tensors="pt")["labels"]
            batch["caption_counts"] = torch.tensor([len(row["captions"]) for row in rows])
        elif kind == "images":
            batch["image_index"] = torch.tensor([row["index"] for row in rows])
        else:
            batch["image_id"] = torch.tensor([int(row["image_id"]) for row in rows])
        return batch

    return collate


def most_frequent_caption(split) -> str:
    """The most frequent training caption (after lowercasing and whitespace normalisation): the trivial baseline."""
    counts = Counter(" ".join(caption.lower().split()) for captions in split["captions"] for caption in captions)
    return counts.most_common(1)[0][0]
