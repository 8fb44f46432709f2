"""``hfcap caption``: caption image files with a saved hfcap model, optionally drawing attention maps.

    hfcap caption photo.jpg other.png --model runs/sat --num-beams 3 --attention-map attention.png

prints ``path<TAB>caption`` per image. ``caption_images`` is the same as a function for Python callers.
"""

import argparse
import sys
from pathlib import Path

import torch


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def configure_parser(parser) -> None:
    """Add the ``hfcap caption`` arguments to ``parser``."""
    parser.add_argument("images", nargs="+", help="image files to caption")
    parser.add_argument("--model", required=True, help="a save_pretrained directory of an hfcap model + processor")
    parser.add_argument("--num-beams", type=_positive_int, help="beam size (default: the model's generation_config)")
    parser.add_argument(
        "--max-new-tokens", type=_positive_int, help="caption length limit (default: generation_config)"
    )
    parser.add_argument(
        "--reference-beam-search",
        action="store_true",
        help="decode with the authors' own beam search (hfcap.reference_beam_search) instead of Hugging Face's",
    )
    parser.add_argument(
        "--attention-map",
        type=Path,
        help="write the attention-map figure to this PNG (several images: NAME_0.png, NAME_1.png, ...)",
    )
    parser.add_argument("--batch-size", type=_positive_int, default=16, help="images per generate call")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def load_captioner(model_dir, device="cpu"):
    """Load ``(model, processor)`` from an hfcap ``save_pretrained`` directory, in eval mode on ``device``.

    Raises:
        ValueError: ``model_dir`` is missing, lacks a config or processor, or holds a model that is not an hfcap
            captioner.
    """
    from transformers import AutoConfig, AutoModel, AutoProcessor

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise ValueError(f"{model_dir} is not a saved hfcap model directory: {error}") from error
    if not type(config).__module__.startswith("hfcap."):
        raise ValueError(f"{model_dir} holds a '{config.model_type}' model, not an hfcap captioning model")
    try:
        processor = AutoProcessor.from_pretrained(model_dir)
    except OSError as error:
        raise ValueError(f"{model_dir} has no loadable hfcap processor (save it with the model): {error}") from error
    return AutoModel.from_pretrained(model_dir).to(device).eval(), processor


def generate_for_images(model, processor, images, **generate_kwargs):
    """Run ``model.generate`` on images (PIL images, arrays or paths) prepared by ``processor``; returns its output."""
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        return model.generate(pixel_values=pixel_values.to(model.device, model.dtype), **generate_kwargs)


def caption_images(model, processor, images, **generate_kwargs) -> list[str]:
    """Caption images; ``generate_kwargs`` go to ``model.generate`` (e.g. ``num_beams=3``).

    Returns one caption per returned sequence: ``len(images) * num_return_sequences`` strings.
    """
    output = generate_for_images(model, processor, images, **generate_kwargs)
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    return processor.batch_decode(sequences, skip_special_tokens=True)


def _attention_map_paths(target: Path, count: int) -> list[Path]:
    """``target`` for one image, else ``target``'s stem suffixed with ``_0``, ``_1``, ..."""
    if count == 1:
        return [target]
    return [target.with_name(f"{target.stem}_{index}{target.suffix}") for index in range(count)]


def run(args) -> int:
    """Caption ``args.images``, print ``path<TAB>caption`` lines, and draw attention maps if asked."""
    from hfcap.processing.processing_captioning import load_image
    from hfcap.visualize import attention_from_generate, attention_map

    try:
        images = [load_image(path) for path in args.images]
        model, processor = load_captioner(args.model, args.device)
    except ValueError as error:
        print(f"hfcap caption: error: {error}", file=sys.stderr)
        return 1

    generate_kwargs = {"return_dict_in_generate": True, "output_attentions": args.attention_map is not None}
    if args.num_beams is not None:
        generate_kwargs["num_beams"] = args.num_beams
    if args.max_new_tokens is not None:
        generate_kwargs["max_new_tokens"] = args.max_new_tokens
    if args.reference_beam_search:
        from hfcap.generation import reference_beam_search

        generate_kwargs["custom_generate"] = reference_beam_search
    map_paths = _attention_map_paths(args.attention_map, len(images)) if args.attention_map else []

    for start in range(0, len(images), args.batch_size):
        batch = images[start : start + args.batch_size]
        output = generate_for_images(model, processor, batch, **generate_kwargs)
        for index, caption in enumerate(processor.batch_decode(output.sequences, skip_special_tokens=True)):
            print(f"{args.images[start + index]}\t{caption}")
            if map_paths:
                token_ids, attentions = attention_from_generate(
                    output,
                    index,
                    eos_token_id=model.generation_config.eos_token_id,
                    pad_token_id=model.generation_config.pad_token_id,
                )
                words = processor.tokenizer.convert_ids_to_tokens(token_ids)
                grid_size = getattr(model.config, "encoder_grid_size", None)
                figure = attention_map(batch[index], words, attentions, grid_size=grid_size)
                map_paths[start + index].parent.mkdir(parents=True, exist_ok=True)
                figure.save(map_paths[start + index])
    return 0
