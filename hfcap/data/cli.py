"""``hfcap data``: generate the embedded scenes dataset, or inspect a Karpathy / COCO / folder dataset.

    hfcap data scenes --output DIR [--train N --val N --test N --seed S --image-size PX --workers W]
    hfcap data inspect --karpathy JSON --images-root DIR [--keep-restval]
    hfcap data inspect --coco ANNOTATIONS_JSON --images-root DIR
    hfcap data inspect --folder DIR
"""

import json
import sys
import time


def configure_parser(parser):
    """Add the ``scenes`` and ``inspect`` subcommands to the ``data`` parser."""
    sub = parser.add_subparsers(dest="data_command", metavar="{scenes,inspect}", required=True)

    scenes = sub.add_parser("scenes", help="Generate the procedural scenes dataset (PNGs + Karpathy JSON).")
    scenes.add_argument("--output", required=True, help="Output folder.")
    scenes.add_argument("--train", type=int, default=10000, help="Number of training images (default 10000).")
    scenes.add_argument("--val", type=int, default=500, help="Number of validation images (default 500).")
    scenes.add_argument("--test", type=int, default=500, help="Number of test images (default 500).")
    scenes.add_argument("--seed", type=int, default=0, help="Random seed; the same seed gives identical files.")
    scenes.add_argument("--image-size", type=int, default=224, help="Image side in pixels (default 224).")
    scenes.add_argument("--workers", type=int, default=2, help="Worker processes (default 2).")

    inspect = sub.add_parser("inspect", help="Load a dataset, validate it, print split sizes and example captions.")
    source = inspect.add_mutually_exclusive_group(required=True)
    source.add_argument("--karpathy", metavar="JSON", help="Karpathy dataset_*.json (needs --images-root).")
    source.add_argument("--coco", metavar="JSON", help="Official COCO captions_*.json (needs --images-root).")
    source.add_argument("--folder", metavar="DIR", help="Folder with images and metadata.jsonl / metadata.csv.")
    inspect.add_argument("--images-root", help="Image folder for --karpathy / --coco.")
    inspect.add_argument("--keep-restval", action="store_true", help="Keep Karpathy's restval as its own split.")
    inspect.add_argument("--skip-bad-records", action="store_true", help="Drop invalid records instead of failing.")
    inspect.add_argument("--examples", type=int, default=3, help="Captions to print per split (default 3).")


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
    from .loaders import load_caption_folder, load_coco_captions, load_karpathy

    if (args.karpathy or args.coco) and not args.images_root:
        print("error: --images-root is required with --karpathy and --coco", file=sys.stderr)
        return 2
    try:
        if args.karpathy:
            splits = load_karpathy(args.karpathy, args.images_root, merge_restval=not args.keep_restval,
                                   skip_bad_records=args.skip_bad_records)
        elif args.coco:
            splits = {"all": load_coco_captions(args.coco, args.images_root, skip_bad_records=args.skip_bad_records)}
        else:
            splits = load_caption_folder(args.folder, skip_bad_records=args.skip_bad_records)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for name, dataset in splits.items():
        captions = dataset["captions"]
        print(f"{name}: {len(dataset)} images, {sum(map(len, captions))} captions")
        for caption_list in captions[: args.examples]:
            print(f"  {caption_list[0]}")
    return 0


def run(args):
    """Dispatch ``hfcap data <scenes|inspect>``; returns the exit status."""
    return _scenes(args) if args.data_command == "scenes" else _inspect(args)
