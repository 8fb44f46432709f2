"""Image processor factory: a stock `ViTImageProcessorPil` (PIL resize, rescale 1/255, normalise), no custom class.

PIL, not transformers' default torchvision backend: the reference implementations resize PIL images with PIL (e.g.
ExpansionNet v2's torchvision `Resize` on a PIL image), so the PIL backend reproduces their `pixel_values` exactly,
where the torchvision backend differs by up to one 8-bit level. `CaptioningProcessor.from_pretrained` loads it back
with the PIL backend.

`load_image` / `ImageLoadError` live in `processing_captioning.py` (which must stay self-contained for Hub remote code)
and are re-exported here.
"""

from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

from .processing_captioning import ImageLoadError, load_image

__all__ = ["ImageLoadError", "load_image", "make_image_processor"]


def make_image_processor(
    image_size: int | tuple[int, int],
    resample: str | PILImageResampling = "bilinear",
    image_mean=IMAGENET_DEFAULT_MEAN,
    image_std=IMAGENET_DEFAULT_STD,
) -> ViTImageProcessorPil:
    """Images -> `pixel_values (B, 3, H, W)` = (resize(image) / 255 - mean) / std, no crop.

    Args:
        image_size: H = W, or (H, W).
        resample: "nearest", "bilinear", "bicubic", "lanczos", "box", "hamming" (or a `PILImageResampling`).
        image_mean, image_std: per-channel normalisation (ImageNet by default).
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    if isinstance(resample, str):
        try:
            resample = PILImageResampling[resample.upper()]
        except KeyError:
            names = ", ".join(member.name.lower() for member in PILImageResampling)
            raise ValueError(f"unknown resample {resample!r}; expected one of {names}") from None
    return ViTImageProcessorPil(
        do_convert_rgb=True,
        do_resize=True,
        size={"height": height, "width": width},
        resample=resample,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(image_mean),
        image_std=list(image_std),
    )
