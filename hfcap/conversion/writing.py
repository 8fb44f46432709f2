"""The last step of every converter: check the converted weights and write the ``save_pretrained`` directory."""

from pathlib import Path

import torch

from ..processing import CaptioningProcessor, make_image_processor, tokenizer_from_vocabulary
from .safe_unpickle import CheckpointError


def write_converted(model, tokens: list[str], special_tokens: dict, output_dir, *, checkpoint, image_size: int,
                    resample: str, num_beams: int | None = None, max_new_tokens: int | None = None,
                    max_caption_length: int = 50) -> Path:
    """Refuse weights with NaN/inf values (naming the tensors), set the generation defaults the user overrides, and
    write model + `CaptioningProcessor` (the authors' vocabulary ``tokens`` with their ids, ``image_size`` squash
    resize with ``resample``) to ``output_dir``; returns it."""
    broken = [name for name, tensor in model.state_dict().items()
              if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        raise CheckpointError(f"{checkpoint} holds NaN or infinite weights in {len(broken)} tensors, e.g. "
                              f"{', '.join(broken[:3])}: refusing to convert a broken model")
    if num_beams is not None:
        model.generation_config.num_beams = num_beams
    if max_new_tokens is not None:
        model.generation_config.max_new_tokens = max_new_tokens
    tokenizer = tokenizer_from_vocabulary(tokens, **special_tokens)
    processor = CaptioningProcessor(make_image_processor(image_size, resample=resample), tokenizer,
                                    max_caption_length=max_caption_length)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir
