"""Visual features stored once and replayed as ``visual_features``: backbone features cached by a frozen backbone, and
region features imported from the authors' files.

ExpansionNet v2's stages 1 and 4 ("feature generation with the frozen Swin") done the hfcap way: the backbone stage
(`model.get_image_features`, the model contract's stage before the encoder) runs once over the dataset in eval mode,
the features are stored as safetensors shards keyed by ``image_id``, and training then feeds them to the model as
``visual_features``, which go through the encoder's trainable layers as pixels would. The same model keeps working
from pixels afterwards (its backbone weights are untouched), so a run can go on end to end. M²'s bottom-up region
features (a variable number per image) live in the same format, with each image's number of positions.

API
---
``cache_visual_features(model, processor, dataset, output_dir, *, batch_size=32, dtype=torch.float32,
shard_size=4096) -> Path``
    Runs ``model.get_image_features(pixel_values)`` under ``no_grad`` in eval mode over every row of ``dataset``
    (columns ``image``, ``image_id``). Single process: under ``accelerate launch`` call it on the main process and let
    the others ``wait_for_everyone``.
``import_region_features(hdf5_path, image_ids, output_dir, *, max_regions=50, dtype=torch.float32) -> Path``
    The authors' bottom-up features file (M²'s ``coco_detections.hdf5``: ``"<image_id>_features"`` (N_i, 2048) per
    image), the first ``max_regions`` rows of each image in stored order, as their ``ImageDetectionsField``; an image
    missing from the file is an error (theirs silently used random features). Needs ``h5py``.
``CachedFeatureDataset(features_dir, dataset=None, *, dtype=torch.float32)``  (a ``torch.utils.data.Dataset``)
    Without ``dataset``: item i = ``{"image_id": int, "visual_features": (N_i, D)}`` in cache order. With a
    ``datasets.Dataset`` (e.g. the train split, possibly selected/shuffled/expanded to one row per caption): item i =
    row i of ``dataset`` without its ``image`` column, plus ``visual_features`` of that row's ``image_id``. Features
    are read lazily (memory-mapped) and cast to ``dtype``; images of different N are padded and masked by the collate
    (``hfcap.training.data.pad_visual_features``).

Layout: ``output_dir/features-XXXXX.safetensors`` (``visual_features (n, N_max, D)`` zero-padded, ``num_positions
(n,)``, ``image_id (n,)``) plus ``output_dir/features.json`` (the index, written last: a folder without it is an
unfinished cache).
"""

import json
from pathlib import Path

import torch

INDEX_NAME = "features.json"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class FeatureCacheWriter:
    """Writes ``(image_id, features (N_i, D))`` pairs as safetensors shards and, on ``close``, the index."""

    def __init__(self, output_dir, *, dtype: torch.dtype = torch.float32, shard_size: int = 4096):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype}")
        self.output_dir, self.dtype, self.shard_size = Path(output_dir), dtype, shard_size
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / INDEX_NAME).unlink(missing_ok=True)
        self.shards, self.pending, self.image_ids, self.dim, self.longest = [], [], set(), None, 0

    def add(self, image_id: int, features: torch.Tensor) -> None:
        if image_id in self.image_ids:
            raise ValueError(f"duplicate image_id {image_id}: cache the per-image dataset, not a per-caption one")
        if features.ndim != 2 or (self.dim is not None and features.shape[1] != self.dim):
            raise ValueError(f"features of image {image_id} have shape {tuple(features.shape)}; expected (N, "
                             f"{self.dim or 'D'})")
        self.dim = features.shape[1]
        self.longest = max(self.longest, features.shape[0])
        self.image_ids.add(image_id)
        self.pending.append((image_id, features.to("cpu", self.dtype)))
        if len(self.pending) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        from .data import pad_visual_features

        ids, features = zip(*self.pending)
        padded, mask = pad_visual_features(list(features))
        name = f"features-{len(self.shards):05d}.safetensors"
        save_file({"visual_features": padded.contiguous(), "num_positions": mask.sum(1),
                   "image_id": torch.tensor(ids)}, str(self.output_dir / name))
        self.shards.append({"file": name, "num_images": len(ids)})
        self.pending.clear()

    def close(self, source: str = "") -> Path:
        if self.pending:
            self._flush()
        index = {"num_images": len(self.image_ids), "num_positions": self.longest, "dim": self.dim,
                 "dtype": str(self.dtype).removeprefix("torch."), "source": source, "shards": self.shards}
        (self.output_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return self.output_dir


def cache_visual_features(model, processor, dataset, output_dir, *, batch_size: int = 32,
                          dtype: torch.dtype = torch.float32, shard_size: int = 4096) -> Path:
    """Compute the backbone-stage features of every image of ``dataset`` once and store them; see the module doc."""
    from tqdm.auto import tqdm

    from .data import make_collate

    writer = FeatureCacheWriter(output_dir, dtype=dtype, shard_size=shard_size)
    loader = torch.utils.data.DataLoader(dataset.select_columns(["image", "image_id"]), batch_size=batch_size,
                                         shuffle=False, collate_fn=make_collate(processor, "evaluation"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc="Caching visual features", unit="batch"):
                features = model.get_image_features(batch["pixel_values"].to(model.device, model.dtype))  # (b, N, D)
                for image_id, image_features in zip(batch["image_id"].tolist(), features):
                    writer.add(image_id, image_features)
    finally:
        model.train(was_training)
    return writer.close(source=getattr(model, "name_or_path", ""))


def import_region_features(hdf5_path, image_ids, output_dir, *, max_regions: int = 50,
                           dtype: torch.dtype = torch.float32, shard_size: int = 4096) -> Path:
    """Store the bottom-up region features of ``image_ids`` from the authors' HDF5 file; see the module doc."""
    try:
        import h5py
    except ImportError:
        raise ImportError("importing region features from HDF5 needs h5py: pip install h5py") from None
    from tqdm.auto import tqdm

    hdf5_path = Path(hdf5_path)
    if not hdf5_path.is_file():
        raise FileNotFoundError(f"region features file not found: {hdf5_path}")
    writer = FeatureCacheWriter(output_dir, dtype=dtype, shard_size=shard_size)
    with h5py.File(hdf5_path, "r") as regions:
        for image_id in tqdm([int(i) for i in image_ids], desc="Importing region features", unit="image"):
            key = f"{image_id}_features"
            if key not in regions:
                raise KeyError(f"{hdf5_path} has no {key!r} (the authors' code would have used random features)")
            writer.add(image_id, torch.from_numpy(regions[key][:max_regions]).float())
    return writer.close(source=str(hdf5_path))


class CachedFeatureDataset(torch.utils.data.Dataset):
    """Cached visual features, optionally joined by ``image_id`` onto the rows of a dataset; see the module doc."""

    def __init__(self, features_dir, dataset=None, *, dtype: torch.dtype = torch.float32):
        from safetensors import safe_open

        self.features_dir = Path(features_dir)
        index_path = self.features_dir / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(f"no feature cache at {self.features_dir} ({INDEX_NAME} missing: not created, or "
                                    "its writing was interrupted)")
        self.index = json.loads(index_path.read_text())
        self.dtype = dtype
        self._location = {}  # image_id -> (shard, row, number of positions)
        for shard, entry in enumerate(self.index["shards"]):
            with safe_open(str(self.features_dir / entry["file"]), framework="pt") as handle:
                lengths = handle.get_tensor("num_positions").tolist()
                for row, (image_id, length) in enumerate(zip(handle.get_tensor("image_id").tolist(), lengths)):
                    self._location[image_id] = (shard, row, length)
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
        """(N, D) features of ``image_id`` (its own N, without padding), cast to ``dtype``."""
        from safetensors import safe_open

        if self._handles is None:  # opened lazily, so each DataLoader worker maps the files itself
            self._handles = [safe_open(str(self.features_dir / entry["file"]), framework="pt")
                             for entry in self.index["shards"]]
        shard, row, length = self._location[image_id]
        return self._handles[shard].get_slice("visual_features")[row][:length].to(self.dtype)

    def __getitem__(self, i: int) -> dict:
        if self.dataset is None:
            image_id = self.image_ids[i]
            return {"image_id": image_id, "visual_features": self.features(image_id)}
        row = self.dataset[i]
        return {**row, "visual_features": self.features(int(row["image_id"]))}
