"""Attention-map figures (Xu et al. 2015, Fig. 2/3) and training curves.

``attention_map`` draws the Show-Attend-Tell figure: the image, then one panel per generated word showing where the
decoder attended (α over the encoder's spatial grid, upsampled and smoothed to the image size, overlaid as a heat
map) with the word printed under it. It works for every hfcap model whose ``cross_attentions`` cover a spatial grid;
``attention_from_generate`` turns the ``cross_attentions`` of ``model.generate(..., output_attentions=True,
return_dict_in_generate=True)`` into the ``(T, N)`` array it needs, for greedy, sampling and beam search.

``plot_training_curves`` plots loss, SCST reward and validation CIDEr-D against the step from a training log.
"""

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from hfcap.processing import load_image

TRAINING_CURVES = {"loss": "loss", "reward": "SCST reward", "val_CIDEr-D": "validation CIDEr-D"}


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

    Returns:
        An RGB image of width ``min(T + 1, max_columns) * P`` and height ``ceil((T + 1) / max_columns) * (P + P // 8)``:
        each cell is the P×P panel above a P//8-pixel label strip. Panel 0 is the plain image.
    """
    import matplotlib

    grids = _attention_grids(attentions, len(caption_tokens), grid_size)
    picture = load_image(image).resize((panel_size, panel_size), Image.Resampling.BICUBIC)
    cmap = matplotlib.colormaps[colormap]
    panels = [(picture, "")] + [
        (_heat_panel(picture, grid, smooth, cmap, opacity), word) for grid, word in zip(grids, caption_tokens)
    ]

    label_height = panel_size // 8
    columns = min(len(panels), max_columns)
    rows = math.ceil(len(panels) / columns)
    figure = Image.new("RGB", (columns * panel_size, rows * (panel_size + label_height)), "white")
    draw = ImageDraw.Draw(figure)
    font = ImageFont.load_default(size=max(label_height * 2 // 3, 8))
    for index, (panel, word) in enumerate(panels):
        left, top = (index % columns) * panel_size, (index // columns) * (panel_size + label_height)
        figure.paste(panel, (left, top))
        draw.text(
            (left + panel_size / 2, top + panel_size + label_height / 2), word, fill="black", font=font, anchor="mm"
        )
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

            Heads and layers are averaged, as ``attention_map`` expects for transformer decoders (SAT has a single
            head and layer).
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
        layers = [layer[row, ..., -1, :].reshape(-1, layer.shape[-1]).mean(0) for layer in attentions[step]]
        maps.append(torch.stack(layers).mean(0).float().cpu())
    return token_ids, torch.stack(maps) if maps else torch.zeros(0, attentions[0][0].shape[-1])


def _read_records(log) -> list[dict]:
    """Records from a JSON-lines file path or an iterable of dicts."""
    if isinstance(log, (str, Path)):
        with open(log, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    return list(log)


def plot_training_curves(log, output_png) -> Path:
    """Plot loss, SCST reward and validation CIDEr-D against ``step`` into a PNG.

    Args:
        log: path of a JSON-lines training log, or a list of records such as
            ``{"step": 10, "stage": "xe", "loss": 3.2}`` / ``{"step": 900, "stage": "scst", "reward": 0.4,
            "val_CIDEr-D": 61.0}``. Each of ``loss``, ``reward`` and ``val_CIDEr-D`` gets a subplot when some record
            has it; each training stage is a separate line.
        output_png: where to write the figure: 500×400 pixels per subplot, side by side.

    Returns:
        The path of the PNG.
    """
    from matplotlib.figure import Figure

    records = [record for record in _read_records(log) if "step" in record]
    keys = [key for key in TRAINING_CURVES if any(record.get(key) is not None for record in records)]
    if not keys:
        raise ValueError(f"no records with 'step' and any of {list(TRAINING_CURVES)} to plot")
    figure = Figure(figsize=(5 * len(keys), 4), dpi=100, layout="constrained")
    for axes, key in zip(figure.subplots(1, len(keys), squeeze=False)[0], keys):
        stages = dict.fromkeys(record.get("stage", "train") for record in records if record.get(key) is not None)
        for stage in stages:
            points = [
                (record["step"], record[key])
                for record in records
                if record.get(key) is not None and record.get("stage", "train") == stage
            ]
            steps, values = zip(*points)
            axes.plot(steps, values, marker="." if len(points) < 50 else None, label=stage)
        axes.set(title=TRAINING_CURVES[key], xlabel="step")
        axes.grid(alpha=0.3)
        axes.legend()
    output_png = Path(output_png)
    output_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output_png, format="png")
    return output_png
