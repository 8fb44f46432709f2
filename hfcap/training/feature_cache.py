"""Visual features computed once by a frozen backbone, for training the captioning body without re-running it.

ExpansionNet v2's stages 1 and 4 ("feature generation with the frozen Swin") done the hfcap way: the backbone stage
(`model.get_image_features`, the model contract's stage before the encoder) runs once over the dataset in eval mode,
the features are stored as safetensors shards keyed by ``image_id``, and training then feeds them to the model as
``visual_features``, which go through the encoder's trainable layers as pixels would. The same model keeps working
from pixels afterwards (its backbone weights are untouched), so a run can go on end to end.

API
---
``cache_visual_features(model, processor, dataset, output_dir, *, batch_size=32, dtype=torch.float32,
shard_size=4096) -> Path``
    Runs ``model.get_image_features(pixel_values)`` under ``no_grad`` in eval mode over every row of ``dataset``
    (columns ``image``, ``image_id``) and writes ``output_dir/features-XXXXX.safetensors`` (tensors
    ``visual_features (n, N, D)`` in ``dtype`` and ``image_id (n,)``) plus ``output_dir/features.json`` (the index,
    written last: a folder without it is an unfinished cache). Returns ``output_dir``. Single process: under
    ``accelerate launch`` call it on the main process and let the others ``wait_for_everyone``.
``CachedFeatureDataset(features_dir, dataset=None, *, dtype=torch.float32)``  (a ``torch.utils.data.Dataset``)
    Without ``dataset``: item i = ``{"image_id": int, "visual_features": (N, D)}`` in cache order. With a
    ``datasets.Dataset`` (e.g. the train split, possibly selected/shuffled/expanded to one row per caption): item i =
    row i of ``dataset`` without its ``image`` column, plus ``visual_features`` of that row's ``image_id``. Features
    are read lazily (memory-mapped) and cast to ``dtype``.
"""

import json
from pathlib import Path

import torch

INDEX_NAME = "features.json"


def cache_visual_features(model, processor, dataset, output_dir, *, batch_size: int = 32,
                          dtype: torch.dtype = torch.float32, shard_size: int = 4096) -> Path:
    """Compute the backbone-stage features of every image of ``dataset`` once and store them; see the module doc."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from .data import make_collate

    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype}")
    image_ids = [int(i) for i in dataset["image_id"]]
    if len(set(image_ids)) != len(image_ids):
        raise ValueError("the dataset has duplicate image_id values; cache the per-image dataset, "
                         "not a per-caption one")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / INDEX_NAME).unlink(missing_ok=True)
    loader = torch.utils.data.DataLoader(dataset.select_columns(["image", "image_id"]), batch_size=batch_size,
                                         shuffle=False, collate_fn=make_collate(processor, "evaluation"))
    was_training = model.training
    model.eval()
    shards, pending, pending_ids = [], [], []

    def flush():
        name = f"features-{len(shards):05d}.safetensors"
        save_file({"visual_features": torch.cat(pending).contiguous(), "image_id": torch.cat(pending_ids)},
                  str(output_dir / name))
        shards.append({"file": name, "num_images": sum(len(ids) for ids in pending_ids)})
        pending.clear()
        pending_ids.clear()

    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc="Caching visual features", unit="batch"):
                features = model.get_image_features(batch["pixel_values"].to(model.device, model.dtype))  # (b, N, D)
                pending.append(features.to("cpu", dtype))
                pending_ids.append(batch["image_id"])
                if sum(len(ids) for ids in pending_ids) >= shard_size:
                    flush()
            if pending:
                flush()
    finally:
        model.train(was_training)
    num_positions, dim = features.shape[1:]
    index = {"num_images": len(image_ids), "num_positions": num_positions, "dim": dim,
             "dtype": str(dtype).removeprefix("torch."), "model": getattr(model, "name_or_path", ""), "shards": shards}
    (output_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return output_dir


class CachedFeatureDataset(torch.utils.data.Dataset):
    """Cached visual features, optionally joined by ``image_id`` onto the rows of a dataset; see the module doc."""

    def __init__(self, features_dir, dataset=None, *, dtype: torch.dtype = torch.float32):
        from safetensors import safe_open

        self.features_dir = Path(features_dir)
        index_path = self.features_dir / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(f"no feature cache at {self.features_dir} ({INDEX_NAME} missing: not created, or "
                                    "cache_visual_features was interrupted)")
        self.index = json.loads(index_path.read_text())
        self.dtype = dtype
        self._location = {}  # image_id -> (shard, row)
        for shard, entry in enumerate(self.index["shards"]):
            with safe_open(str(self.features_dir / entry["file"]), framework="pt") as handle:
                for row, image_id in enumerate(handle.get_tensor("image_id").tolist()):
                    self._location[image_id] = (shard, row)
        self._handles = None
        self.image_ids = list(self._location)
        self.dataset = dataset
        if dataset is not None:
            if "image" in dataset.column_names:
                self.dataset = dataset.remove_columns("image")
            missing = sorted(set(int(i) for i in self.dataset["image_id"]) - self._location.keys())
            if missing:
                raise KeyError(f"{len(missing)} image ids of the dataset are not in the feature cache "
                               f"{self.features_dir}, e.g. {missing[:5]}")

    def __getstate__(self):
        return {**self.__dict__, "_handles": None}  # open file handles do not pickle (spawned DataLoader workers)

    def __len__(self) -> int:
        return len(self.dataset) if self.dataset is not None else len(self.image_ids)

    def features(self, image_id: int) -> torch.Tensor:
        """(N, D) features of ``image_id``, cast to ``dtype``."""
        from safetensors import safe_open

        if self._handles is None:  # opened lazily, so each DataLoader worker maps the files itself
            self._handles = [safe_open(str(self.features_dir / entry["file"]), framework="pt")
                             for entry in self.index["shards"]]
        shard, row = self._location[image_id]
        return self._handles[shard].get_slice("visual_features")[row].to(self.dtype)

    def __getitem__(self, i: int) -> dict:
        if self.dataset is None:
            image_id = self.image_ids[i]
            return {"image_id": image_id, "visual_features": self.features(image_id)}
        row = self.dataset[i]
        return {**row, "visual_features": self.features(int(row["image_id"]))}
