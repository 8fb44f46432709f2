"""Attention-map figures (Xu et al. 2015, Fig. 2/3), drawn in one place for `hfcap caption` and the trainer.

``attention_map`` draws the Show-Attend-Tell figure: the image, then one panel per generated word showing where the
decoder attended (α over the visual grid, upsampled and smoothed to the image size, overlaid as a heat map) with the
word printed under it. It works for every hfcap model whose ``cross_attentions`` cover a spatial grid (SAT's pooled
CNN map, ExpansionNet v2's 12×12 Swin grid, a pixel-input M²'s backbone grid; not region features);
``attention_from_generate`` turns the ``cross_attentions`` of ``model.generate(..., output_attentions=True,
return_dict_in_generate=True)`` into the ``(T, N)`` array it needs — the last decoder layer's cross-attention,
averaged over heads (and M²'s encoder levels), as ``ATTENTION_NOTE`` says in every figure — for greedy, sampling and
beam search. ``save_attention_maps`` captions images and writes their figures.
"""

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from hfcap.processing import load_image

ATTENTION_NOTE = "attention: cross-attention of the last decoder layer, mean over heads"


def _as_numpy(array) -> np.ndarray:
    """A float64 numpy copy of a torch tensor or array-like."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().double().numpy()
    return np.asarray(array, dtype=np.float64)


def _attention_grids(attentions, num_words: int, grid_size) -> np.ndarray:
    """Validate ``attentions`` ((T, N) or (T, h, w)) and return it as a (T, h, w) array."""
    attentions = _as_numpy(attentions)
    if attentions.ndim not in (2, 3):
        raise ValueError(f"attentions must have shape (T, N) or (T, h, w), got {attentions.shape}")
    if attentions.shape[0] != num_words:
        raise ValueError(f"attentions cover {attentions.shape[0]} steps but there are {num_words} caption tokens")
    if attentions.ndim == 3:
        return attentions
    num_positions = attentions.shape[1]
    if grid_size is None:
        side = math.isqrt(num_positions)
        if side * side != num_positions:
            raise ValueError(
                f"cannot infer a square grid from N={num_positions} attention positions; pass grid_size=(h, w)"
            )
        grid_size = (side, side)
    height, width = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if height * width != num_positions:
        raise ValueError(f"grid_size {height}x{width} does not match N={num_positions} attention positions")
    return attentions.reshape(num_words, height, width)


def _heat_panel(image: Image.Image, alpha: np.ndarray, smooth: bool, colormap, opacity: float) -> Image.Image:
    """The image with α (h, w) min-max scaled to [0, 1] (as the tutorial's imshow does), upsampled to the image size
    and blended in as a heat map whose weight grows with the heat, so unattended regions keep the image's colours."""
    size = image.size[0]
    spread = alpha.max() - alpha.min()
    scaled = (alpha - alpha.min()) / spread if spread > 0 else np.zeros_like(alpha)
    heat = Image.fromarray(np.round(scaled * 255).astype(np.uint8), mode="L")
    if smooth:
        # The tutorial's pyramid_expand(upscale=24, sigma=8): bicubic upsampling, then a Gaussian of a third of a cell.
        heat = heat.resize((size, size), Image.Resampling.BICUBIC)
        heat = heat.filter(ImageFilter.GaussianBlur(radius=size / max(alpha.shape) / 3))
    else:
        heat = heat.resize((size, size), Image.Resampling.NEAREST)
    heat = np.asarray(heat, dtype=np.float64)[..., None] / 255.0
    weight = opacity * heat
    blended = (1 - weight) * np.asarray(image, dtype=np.float64) + weight * 255.0 * colormap(heat[..., 0])[..., :3]
    return Image.fromarray(np.round(blended).astype(np.uint8), mode="RGB")


def attention_map(
    image,
    caption_tokens: list[str],
    attentions,
    *,
    grid_size: int | tuple[int, int] | None = None,
    smooth: bool = True,
    max_columns: int = 5,
    panel_size: int = 224,
    colormap: str = "jet",
    opacity: float = 0.7,
    note: str | None = None,
) -> Image.Image:
    """Draw the image followed by one attention panel per caption token.

    Args:
        image: path, PIL image, uint8 array or tensor (anything hfcap's ``load_image`` reads). It is resized to a
            square, as the models' processors do, so the attention grid lines up with it.
        caption_tokens: the T generated words (without bos/eos), printed under their panels.
        attentions: α of shape (T, N) over N = h·w grid positions in row-major order (the flattened encoder map),
            or (T, h, w). Tensor or array.
        grid_size: ``g`` or ``(h, w)`` of the grid when ``attentions`` is (T, N); default: square, g = sqrt(N).
        smooth: bicubic + Gaussian upsampling of α (as in the paper's figure); False shows the raw cells.
        max_columns: panels per row.
        panel_size: side P of each square panel in pixels.
        colormap: matplotlib colormap name for the heat map; opacity: its blending weight where α is largest.
        note: a line printed under the plain image saying what α is (e.g. ``ATTENTION_NOTE``).

    Returns:
        An RGB image of width ``min(T + 1, max_columns) * P`` and height ``ceil((T + 1) / max_columns) * (P + P // 8)``:
        each cell is the P×P panel above a P//8-pixel label strip. Panel 0 is the plain image (with ``note`` under it).
    """
    import matplotlib

    grids = _attention_grids(attentions, len(caption_tokens), grid_size)
    picture = load_image(image).resize((panel_size, panel_size), Image.Resampling.BICUBIC)
    cmap = matplotlib.colormaps[colormap]
    panels = [(picture, note or "")] + [
        (_heat_panel(picture, grid, smooth, cmap, opacity), word) for grid, word in zip(grids, caption_tokens)
    ]

    label_height = panel_size // 8
    columns = min(len(panels), max_columns)
    rows = math.ceil(len(panels) / columns)
    figure = Image.new("RGB", (columns * panel_size, rows * (panel_size + label_height)), "white")
    draw = ImageDraw.Draw(figure)
    font = ImageFont.load_default(size=max(label_height * 2 // 3, 8))
    small_font = ImageFont.load_default(size=max(label_height // 3, 6))
    for index, (panel, word) in enumerate(panels):
        left, top = (index % columns) * panel_size, (index // columns) * (panel_size + label_height)
        figure.paste(panel, (left, top))
        draw.text((left + panel_size / 2, top + panel_size + label_height / 2), word, fill="black",
                  font=small_font if index == 0 else font, anchor="mm")
    return figure


def attention_from_generate(output, index: int = 0, *, eos_token_id, pad_token_id=None, prompt_length: int = 1):
    """Token ids and their attention maps for one sequence of a ``generate`` output.

    Args:
        output: the result of ``model.generate(..., output_attentions=True, return_dict_in_generate=True)``. Its
            ``cross_attentions`` come in one of two layouts:

            - Hugging Face decoding (greedy, sampling, beam search): per generated step, a tuple with one tensor per
              layer of shape (rows, [heads...,] q, N); the last query position produced the step's token.
            - whole sequences (``hfcap.reference_beam_search``): one tensor per layer of shape
              (rows, [heads...,] L - 1, N) whose position t produced token t + 1.

            The last layer's map is taken and averaged over every other axis (heads; M²'s encoder levels), which is
            ``ATTENTION_NOTE`` (SAT has a single head and layer).
        index: which returned sequence (row of ``output.sequences``). With beam search ``output.beam_indices``
            says which beam row each step's token came from, so the maps follow the final hypothesis.
        eos_token_id: int or list of ints; decoding stops before the first of them (or ``pad_token_id``).
        prompt_length: decoder tokens given before generation (1: just the decoder start token).

    Returns:
        ``(token_ids, attentions)``: the generated ids up to and excluding eos/pad, and a float tensor (T, N).
    """
    import torch

    attentions = output.cross_attentions
    if not attentions:
        raise ValueError(
            "the generate output has no cross_attentions: call generate(..., output_attentions=True, "
            "return_dict_in_generate=True)"
        )
    if isinstance(attentions[0], torch.Tensor):  # whole sequences: split into the per-step layout
        attentions = [tuple(layer[..., t : t + 1, :] for layer in attentions) for t in range(attentions[0].shape[-2])]
    stop_ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    if pad_token_id is not None:
        stop_ids.add(pad_token_id)
    beam_indices = getattr(output, "beam_indices", None)
    token_ids, maps = [], []
    for step, token in enumerate(output.sequences[index, prompt_length:][: len(attentions)].tolist()):
        row = index if beam_indices is None else int(beam_indices[index, step])
        if token in stop_ids or row < 0:
            break
        token_ids.append(token)
        last_layer = attentions[step][-1]
        maps.append(last_layer[row, ..., -1, :].reshape(-1, last_layer.shape[-1]).mean(0).float().cpu())
    return token_ids, torch.stack(maps) if maps else torch.zeros(0, attentions[0][0].shape[-1])


def save_attention_maps(model, processor, images, paths, **generate_kwargs) -> list[str]:
    """Caption `images` (anything `load_image` reads) with `model.generate(**generate_kwargs)` and write each image's
    attention figure to the matching entry of `paths`; returns the captions (one per image)."""
    import torch

    if generate_kwargs.get("num_return_sequences", 1) != 1:
        raise ValueError("attention maps are drawn for one caption per image: do not set num_return_sequences")
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(model.device, model.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model.generate(pixel_values=pixel_values, **generate_kwargs, output_attentions=True,
                                    return_dict_in_generate=True)
    finally:
        model.train(was_training)
    for index, (image, path) in enumerate(zip(images, paths)):
        token_ids, attentions = attention_from_generate(output, index, eos_token_id=model.generation_config.eos_token_id,
                                                        pad_token_id=model.generation_config.pad_token_id)
        words = processor.tokenizer.convert_ids_to_tokens(token_ids)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        attention_map(image, words, attentions, note=ATTENTION_NOTE).save(path)
    return processor.batch_decode(output.sequences, skip_special_tokens=True)
