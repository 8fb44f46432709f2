"""``hfcap data``: generate the embedded scenes dataset, or inspect any dataset hfcap loads.

    hfcap data scenes --output DIR [--train N --val N --test N --seed S --image-size PX --workers W]
    hfcap data inspect [--data scenes|karpathy|coco|folder ...]   (the flags of hfcap.data.sources)
    hfcap data regions --hdf5 coco_detections.hdf5 --output DIR [--max-regions 50] [--data ...]
        the authors' bottom-up region features (M²) of every image of the dataset, as a feature cache for
        `data.visual_features_dir` / `hfcap evaluate --visual-features`
"""

import json
import time

from hfcap.cli import int_at_least

from .sources import add_data_arguments, data_source_from_args, load_data_source


def configure_parser(parser):
    """Add the ``scenes`` and ``inspect`` subcommands to the ``data`` parser."""
    sub = parser.add_subparsers(dest="data_command", metavar="{scenes,inspect,regions}", required=True)

    scenes = sub.add_parser("scenes", help="Generate the procedural scenes dataset (PNGs + Karpathy JSON).")
    scenes.add_argument("--output", required=True, help="Output folder.")
    scenes.add_argument("--train", type=int_at_least(1), default=10000,
                        help="Number of training images (default 10000).")
    scenes.add_argument("--val", type=int_at_least(0), default=500, help="Number of validation images (default 500).")
    scenes.add_argument("--test", type=int_at_least(0), default=500, help="Number of test images (default 500).")
    scenes.add_argument("--seed", type=int, default=0, help="Random seed; the same seed gives identical files.")
    scenes.add_argument("--image-size", type=int_at_least(16), default=224, help="Image side in pixels (default 224).")
    scenes.add_argument("--workers", type=int_at_least(1), default=2, help="Worker processes (default 2).")

    inspect = sub.add_parser("inspect", help="Load a dataset, validate it, print split sizes and example captions.")
    add_data_arguments(inspect, coco_split="an 'all'")
    inspect.add_argument("--examples", type=int_at_least(0), default=3,
                         help="Captions to print per split (default 3).")

    regions = sub.add_parser("regions", help="Import bottom-up region features (HDF5, M²'s format) as a feature cache.")
    regions.add_argument("--hdf5", required=True, help="The authors' features file ('<image_id>_features' datasets).")
    regions.add_argument("--output", required=True, help="Feature cache folder to write.")
    regions.add_argument("--max-regions", type=int_at_least(1), default=50,
                         help="Keep the first N regions of each image in stored order (default 50, the authors').")
    add_data_arguments(regions, coco_split="an 'all'")


def _scenes(args):
    from .scenes import generate_scenes

    start = time.perf_counter()
    json_path = generate_scenes(args.output, num_train=args.train, num_val=args.val, num_test=args.test,
                                seed=args.seed, image_size=args.image_size, num_workers=args.workers)
    seconds = time.perf_counter() - start
    total = args.train + args.val + args.test
    print(f"Wrote {total} scenes (train {args.train}, val {args.val}, test {args.test}) to {args.output} "
          f"in {seconds:.1f} s")
    print(f"Karpathy JSON: {json_path}")
    for image in json.loads(json_path.read_text())["images"][:3]:
        print(f"  {image['filepath']}/{image['filename']}: {image['sentences'][0]['raw']}")
    return 0


def _inspect(args):
    splits = load_data_source(data_source_from_args(args, coco_split="all"))
    for name, dataset in splits.items():
        captions = dataset["captions"]
        print(f"{name}: {len(dataset)} images, {sum(map(len, captions))} captions")
        for caption_list in captions[: args.examples]:
            print(f"  {caption_list[0]}")
    return 0


def _regions(args):
    from hfcap.training.feature_cache import import_region_features

    splits = load_data_source(data_source_from_args(args, coco_split="all"))
    image_ids = sorted({int(image_id) for split in splits.values() for image_id in split["image_id"]})
    output = import_region_features(args.hdf5, image_ids, args.output, max_regions=args.max_regions)
    print(f"Wrote the region features of {len(image_ids)} images to {output}")
    return 0


def run(args):
    """Dispatch ``hfcap data <scenes|inspect|regions>``; errors reach ``hfcap.cli``."""
    return {"scenes": _scenes, "inspect": _inspect, "regions": _regions}[args.data_command](args)
