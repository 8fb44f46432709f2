"""``hfcap caption``: caption image files with a saved hfcap model, optionally drawing attention maps.

    hfcap caption photo.jpg other.png --model runs/sat --num-beams 3 --attention-map attention.png

prints ``path<TAB>caption`` per image. ``caption_images`` is the same as a function for Python callers.
"""

from pathlib import Path

import torch


def configure_parser(parser) -> None:
    """Add the ``hfcap caption`` arguments to ``parser``."""
    from hfcap.generation import add_generation_arguments

    parser.add_argument("images", nargs="+", help="image files to caption")
    parser.add_argument("--model", required=True, help="a save_pretrained directory of an hfcap model + processor")
    add_generation_arguments(parser)
    parser.add_argument(
        "--attention-map",
        type=Path,
        help="write the attention-map figure to this PNG (several images: NAME_0.png, NAME_1.png, ...)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per generate call")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def caption_images(model, processor, images, **generate_kwargs) -> list[str]:
    """Caption images (PIL images, arrays or paths); ``generate_kwargs`` go to ``model.generate`` (e.g.
    ``num_beams=3``). Returns one caption per returned sequence: ``len(images) * num_return_sequences`` strings."""
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        output = model.generate(pixel_values=pixel_values.to(model.device, model.dtype), **generate_kwargs)
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    return processor.batch_decode(sequences, skip_special_tokens=True)


def _attention_map_paths(target: Path, count: int) -> list[Path]:
    """``target`` for one image, else ``target``'s stem suffixed with ``_0``, ``_1``, ..."""
    if count == 1:
        return [target]
    return [target.with_name(f"{target.stem}_{index}{target.suffix}") for index in range(count)]


def run(args) -> int:
    """Caption ``args.images``, print ``path<TAB>caption`` lines, and draw attention maps if asked; errors reach
    ``hfcap.cli``."""
    from hfcap.generation import generate_kwargs_from_args
    from hfcap.loading import load_captioner
    from hfcap.processing.processing_captioning import load_image
    from hfcap.visualize import save_attention_maps

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    images = [load_image(path) for path in args.images]
    model, processor = load_captioner(args.model, args.device)
    generate_kwargs = generate_kwargs_from_args(args)
    map_paths = _attention_map_paths(args.attention_map, len(images)) if args.attention_map else None
    for start in range(0, len(images), args.batch_size):
        batch = images[start : start + args.batch_size]
        if map_paths:
            paths = map_paths[start : start + args.batch_size]
            captions = save_attention_maps(model, processor, batch, paths, **generate_kwargs)
        else:
            captions = caption_images(model, processor, batch, **generate_kwargs)
        for index, caption in enumerate(captions):
            print(f"{args.images[start + index]}\t{caption}")
    return 0
