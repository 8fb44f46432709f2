"""The one dataset dispatcher: which (image, captions) data to load, for the trainer, `hfcap evaluate` and
`hfcap data inspect` alike.

    DataSource(name="scenes" | "karpathy" | "coco" | "folder", ...)   where the data comes from (a training config's
                                                                        `data:` section extends it)
    load_data_source(source) -> DatasetDict                           split name -> Dataset(image, captions, image_id)
    add_data_arguments(parser) / data_source_from_args(args)         the same choice as command-line flags
"""

from dataclasses import dataclass, field

DATA_SOURCES = ("scenes", "karpathy", "coco", "folder")


@dataclass
class DataSource:
    """Where the (image, captions) data comes from.

    ``name``: ``scenes`` (the embedded procedural dataset, generated into ``cache_dir`` when absent, with
    ``num_train``/``num_val``/``num_test`` images of ``scenes_image_size`` px from ``seed``), ``karpathy``
    (``json_path`` + ``images_root``; restval merged into train unless ``keep_restval``), ``coco`` (official caption
    annotations: ``annotations`` and ``images_dir`` map each split name to a file / folder) or ``folder`` (``root``
    with images + metadata.jsonl/csv). ``skip_bad_records``: drop (and count) malformed records instead of failing.
    """

    name: str = "scenes"
    num_train: int = 10000
    num_val: int = 500
    num_test: int = 500
    scenes_image_size: int = 224
    seed: int = 0
    cache_dir: str | None = None
    json_path: str | None = None
    images_root: str | None = None
    keep_restval: bool = False
    annotations: dict[str, str] = field(default_factory=dict)
    images_dir: dict[str, str] = field(default_factory=dict)
    root: str | None = None
    skip_bad_records: bool = False

    def check(self, where: str = "data") -> None:
        """Raise ``ValueError`` naming the first missing or invalid setting."""
        if self.name not in DATA_SOURCES:
            raise ValueError(f"{where}.name must be one of {list(DATA_SOURCES)}, got {self.name!r}")
        if self.name == "scenes":
            for key in ("num_train", "num_val", "num_test", "scenes_image_size"):
                if getattr(self, key) < (1 if key in ("num_train", "scenes_image_size") else 0):
                    raise ValueError(f"{where}.{key} must be positive, got {getattr(self, key)}")
        if self.name == "karpathy" and not (self.json_path and self.images_root):
            raise ValueError(f"{where}.name=karpathy needs {where}.json_path and {where}.images_root")
        if self.name == "coco" and not self.annotations:
            raise ValueError(f"{where}.name=coco needs {where}.annotations (split name -> captions json)")
        if self.name == "coco" and set(self.images_dir) != set(self.annotations):
            raise ValueError(f"{where}.images_dir must name an image folder for every split in {where}.annotations")
        if self.name == "folder" and not self.root:
            raise ValueError(f"{where}.name=folder needs {where}.root")


def load_data_source(source: DataSource):
    """The ``DatasetDict`` (split name -> ``Dataset`` with ``image``, ``captions``, ``image_id``) ``source`` names."""
    from datasets import DatasetDict

    from . import load_caption_folder, load_coco_captions, load_karpathy, load_scenes

    source.check()
    if source.name == "scenes":
        return load_scenes(source.cache_dir, num_train=source.num_train, num_val=source.num_val,
                           num_test=source.num_test, seed=source.seed, image_size=source.scenes_image_size)
    if source.name == "karpathy":
        return load_karpathy(source.json_path, source.images_root, merge_restval=not source.keep_restval,
                             skip_bad_records=source.skip_bad_records)
    if source.name == "coco":
        return DatasetDict({split: load_coco_captions(path, source.images_dir[split],
                                                      skip_bad_records=source.skip_bad_records)
                            for split, path in source.annotations.items()})
    return load_caption_folder(source.root, skip_bad_records=source.skip_bad_records)


def add_data_arguments(parser, *, coco_split: str = "the --split") -> None:
    """The flags choosing a ``DataSource`` (read back by ``data_source_from_args``)."""
    group = parser.add_argument_group("data")
    group.add_argument("--data", choices=DATA_SOURCES, default="scenes", help="dataset kind (default: scenes)")
    group.add_argument("--karpathy-json", help="Karpathy dataset_*.json (--data karpathy; needs --images-root)")
    group.add_argument("--coco-annotations", help=f"official COCO captions_*.json, loaded as {coco_split} split "
                                                  "(--data coco; needs --images-root)")
    group.add_argument("--images-root", help="image folder (--data karpathy / coco)")
    group.add_argument("--keep-restval", action="store_true", help="keep Karpathy's restval as its own split")
    group.add_argument("--folder", help="folder with images + metadata.jsonl / metadata.csv (--data folder)")
    group.add_argument("--scenes-dir", help="cache folder of the scenes dataset (default: $HFCAP_CACHE)")
    group.add_argument("--scenes-sizes", type=int, nargs=3, default=(10000, 500, 500), metavar=("TRAIN", "VAL", "TEST"),
                       help="scenes split sizes (default: 10000 500 500, what `make train` uses)")
    group.add_argument("--scenes-image-size", type=int, default=224, help="scenes image side (default: 224)")
    group.add_argument("--scenes-seed", type=int, default=0, help="scenes seed (default: 0)")
    group.add_argument("--skip-bad-records", action="store_true", help="drop invalid records instead of failing")


def data_source_from_args(args, coco_split: str) -> DataSource:
    """The ``DataSource`` of ``add_data_arguments``' flags; ``--coco-annotations`` becomes split ``coco_split``."""
    needed = {"karpathy": ("karpathy_json", "images_root"), "coco": ("coco_annotations", "images_root"),
              "folder": ("folder",)}.get(args.data, ())
    missing = [f"--{name.replace('_', '-')}" for name in needed if not getattr(args, name)]
    if missing:
        raise ValueError(f"--data {args.data} needs {' and '.join(missing)}")
    num_train, num_val, num_test = args.scenes_sizes
    source = DataSource(
        name=args.data, num_train=num_train, num_val=num_val, num_test=num_test,
        scenes_image_size=args.scenes_image_size, seed=args.scenes_seed, cache_dir=args.scenes_dir,
        json_path=args.karpathy_json, images_root=args.images_root, keep_restval=args.keep_restval,
        annotations={coco_split: args.coco_annotations} if args.coco_annotations else {},
        images_dir={coco_split: args.images_root} if args.coco_annotations and args.images_root else {},
        root=args.folder, skip_bad_records=args.skip_bad_records,
    )
    source.check()
    return source


__all__ = ["DATA_SOURCES", "DataSource", "add_data_arguments", "data_source_from_args", "load_data_source"]
