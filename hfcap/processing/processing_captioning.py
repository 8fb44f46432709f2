"""Captioning processor: images -> `pixel_values`, decoder prompts -> `input_ids`, captions -> `labels`.

Self-contained (torch / transformers / PIL / numpy only): it is copied flat into saved Hub repos as remote code.

Layouts, with words w and the tokenizer's special ids:
    input_ids (B, T)  = [pad ... pad, bos, w1 .. wk]     decoder prompts, left padded, no eos; text="" -> [[bos]]
    attention_mask    = [0 ... 0, 1, 1 .. 1]
    labels (B, T)     = [w1 .. wn, eos, -100 ... -100]   training captions, right padded with -100
Models shift `labels` right with `decoder_start_token_id` (= bos) to get their teacher-forcing inputs.
"""

import os
import stat
import warnings

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin

PROCESSOR_FILES = ("processor_config.json", "tokenizer.json", "tokenizer_config.json")
"""What `CaptioningProcessor.save_pretrained` writes: the image processor settings and max_caption_length, the
word-level vocabulary, and the tokenizer's special tokens."""


class ImageLoadError(ValueError):
    """An image that cannot be read or converted to RGB; the message names the file."""


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """RGBA-like image -> RGB composited on white (transparent pixels become white, not the hidden colour)."""
    if image.mode == "La":  # premultiplied: PIL converts it only to LA (which un-premultiplies it)
        image = image.convert("LA")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    16/32-bit integer modes (I;16, I;16B, I) are taken as 16-bit data and scaled by 255/65535 (65535 -> 255), not
    clipped at 255 as PIL's own conversion does. F (float) images are taken as [0, 1] intensities when all values lie
    in [0, 1], otherwise as 0..255 (PIL's convention); values outside are clipped.
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode.startswith("I"):
        gray = np.rint(np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257.0)
        return Image.fromarray(gray.astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ImageLoadError("float (mode F) image holds NaN or infinite values")
        scale = 255.0 if values.size and 0.0 <= values.min() and values.max() <= 1.0 else 1.0
        gray = np.rint(np.clip(values * scale, 0, 255))
        return Image.fromarray(gray.astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        return _flatten_alpha(image)
    return image.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV


def _array_to_pil(array: np.ndarray) -> Image.Image:
    """uint8 array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> PIL image of mode L / RGB / RGBA."""
    if array.dtype != np.uint8:
        raise ImageLoadError(
            f"image array has dtype {array.dtype}; expected uint8 values 0..255 "
            "(convert floats in [0, 1] with (x * 255).round().astype(np.uint8))"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return Image.fromarray(array, mode="L")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(array), mode="RGB" if array.shape[2] == 3 else "RGBA")
    raise ImageLoadError(f"image array has shape {tuple(array.shape)}; expected (H, W), (H, W, 1|3|4)")


def _open_image_file(path: str, max_pixels: int | None) -> Image.Image:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ImageLoadError(f"image file not found: {path}") from None
    except OSError as error:
        raise ImageLoadError(f"cannot read image file {path}: {error}") from None
    if not stat.S_ISREG(mode):  # a FIFO or device would block or never end
        raise ImageLoadError(f"not a regular file: {path}")
    try:
        with Image.open(path) as opened:
            _check_size(opened.size, max_pixels, path)
            opened.load()  # decode now, so truncated files fail here rather than later
            return _to_rgb(opened)
    except Image.UnidentifiedImageError:
        raise ImageLoadError(f"not an image file (or an unsupported format): {path}") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        if isinstance(error, ImageLoadError):
            raise
        raise ImageLoadError(f"cannot read image file {path} (corrupt, truncated or unreadable): {error}") from None


def _check_size(size, max_pixels: int | None, name: str = "image") -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageLoadError(f"{name} has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(f"{name} has {width}x{height} pixels, more than max_image_pixels={max_pixels}")


def load_image(image, max_pixels: int | None = None) -> Image.Image:
    """Load one image as an 8-bit RGB `PIL.Image`.

    Accepts a path (str / os.PathLike) of a regular file, a PIL image of any mode, a uint8 numpy array (H, W) /
    (H, W, 1|3|4), or a uint8 torch tensor (C, H, W) with C in 1, 3, 4. Transparency is composited on white. EXIF
    orientation is not applied: COCO's captions describe the stored pixel orientation, and the reference
    implementations ignore it. Images with more than `max_pixels` pixels are refused (None: no limit beyond PIL's
    decompression-bomb guard).
    Raises `ImageLoadError` (naming the file) for a missing, unreadable, corrupt or truncated file, an empty image, a
    float image with NaN/inf, and `TypeError` for something that is not an image.
    """
    if isinstance(image, (str, os.PathLike)):
        return _open_image_file(os.fspath(image), max_pixels)
    if isinstance(image, Image.Image):
        _check_size(image.size, max_pixels)
        return _to_rgb(image)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
            raise ImageLoadError(f"image tensor has shape {tuple(image.shape)}; expected (C, H, W), C in 1, 3, 4")
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        picture = _array_to_pil(image)
        _check_size(picture.size, max_pixels)
        return _to_rgb(picture)
    raise TypeError(f"unsupported image type {type(image).__name__}: expected a path, PIL image, array or tensor")


class CaptioningProcessor(ProcessorMixin):
    """Image processor + word-level tokenizer for encoder-decoder captioning models.

    Args:
        image_processor: a transformers image processor (e.g. `ViTImageProcessorPil` with `do_convert_rgb=True`).
        tokenizer: a word-level tokenizer with pad/bos/eos/unk tokens set.
        max_caption_length: training captions longer than this many words are truncated (eos is kept after them).
        max_image_pixels: refuse images with more pixels than this (None: no limit beyond PIL's bomb guard).
    """

    def __init__(self, image_processor=None, tokenizer=None, max_caption_length: int = 50,
                 max_image_pixels: int | None = None, **kwargs):
        for name, value, optional in (("max_caption_length", max_caption_length, False),
                                      ("max_image_pixels", max_image_pixels, True)):
            if not (optional and value is None) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer{' or None' if optional else ''}, got {value!r}")
        self.max_caption_length = max_caption_length
        self.max_image_pixels = max_image_pixels
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`ProcessorMixin.from_pretrained` with the PIL image backend by default, except that a local directory lacking any of `PROCESSOR_FILES` (e.g. a
        model saved without its processor) raises a FileNotFoundError naming them. Without this check transformers
        asks for a preprocessor_config.json that a CaptioningProcessor never writes, or, without
        tokenizer_config.json, loads a tokenizer that has no pad/bos/eos tokens."""
        kwargs.setdefault("backend", "pil")  # resize as the reference implementations (see image_processing.py)
        directory = os.fspath(pretrained_model_name_or_path)
        if kwargs.get("subfolder"):
            directory = os.path.join(directory, kwargs["subfolder"])
        missing = [name for name in PROCESSOR_FILES if not os.path.isfile(os.path.join(directory, name))]
        if missing and os.path.isdir(directory):  # not a Hub repo id
            raise FileNotFoundError(
                f"cannot load the captioning processor from {directory}: it has no {', '.join(missing)}. A model "
                "directory needs its CaptioningProcessor saved next to the model: processor.save_pretrained(directory) "
                "(hfcap convert and hfcap train save both)"
            )
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "input_ids", "attention_mask"]

    def __call__(self, images=None, text=None, text_target=None, return_tensors="pt", padding=True) -> BatchFeature:
        """Prepare a batch.

        Args:
            images: one image or a list (paths, PIL images, arrays, tensors; each goes through `load_image`).
            text: decoder prompt(s), e.g. "" or "a man". Every prompt word must be in the vocabulary.
            text_target: training caption(s); unknown words become unk.
            return_tensors: "pt", "np" or None (python lists).
            padding: accepted for the image-text-to-text pipeline, which passes `padding=True`; prompts and labels
                are always padded to the longest in the batch.

        Returns:
            BatchFeature with `pixel_values (B, 3, H, W)` if images, `input_ids (B, T)` and `attention_mask (B, T)`
            if text, `labels (B, T')` if text_target.
        """
        if images is None and text is None and text_target is None:
            raise ValueError("CaptioningProcessor needs at least one of images, text or text_target")
        if padding not in (True, "longest"):
            raise ValueError(f"padding={padding!r} is not supported: batches are always padded to the longest")
        single = (str, Image.Image, np.ndarray, torch.Tensor, os.PathLike)
        inputs = {}
        for name, value in (("images", images), ("text", text), ("text_target", text_target)):
            if value is None:
                continue
            if isinstance(value, single):
                inputs[name] = [value]
            elif isinstance(value, (dict, set)) or not hasattr(value, "__iter__"):
                raise TypeError(f"`{name}` must be one item or a sequence of them, got {type(value).__name__}")
            else:
                inputs[name] = list(value)
        for name in ("text", "text_target"):
            for index, item in enumerate(inputs.get(name, ())):
                if not isinstance(item, str):
                    raise TypeError(f"`{name}[{index}]` must be a string, got {type(item).__name__}")
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"`{name}[{index}]` is not valid Unicode text (e.g. a lone surrogate)") from None
        sizes = {name: len(value) for name, value in inputs.items()}
        if len(set(sizes.values())) > 1 or 0 in sizes.values():
            raise ValueError(f"batch sizes differ or are empty: {sizes}")
        data = {}
        if "images" in inputs:
            images = [load_image(image, self.max_image_pixels) for image in inputs["images"]]
            data["pixel_values"] = self.image_processor(images, return_tensors=return_tensors)["pixel_values"]
        if "text" in inputs:
            data.update(self._encode_prompts(inputs["text"]))
        if "text_target" in inputs:
            data["labels"] = self._encode_captions(inputs["text_target"])
        return BatchFeature(data, tensor_type=return_tensors)

    def _encode_prompts(self, prompts: list[str]) -> dict[str, list[list[int]]]:
        """Prompts -> left-padded `[bos] + words` ids and their attention mask; unknown words raise ValueError."""
        tokenizer, rows = self.tokenizer, []
        for prompt in prompts:
            encoding = tokenizer.backend_tokenizer.encode(prompt, add_special_tokens=False)
            spans = zip(encoding.ids, encoding.offsets)
            unknown = [prompt[start:end] for i, (start, end) in spans if i == tokenizer.unk_token_id]
            if unknown:
                # generating after an unk prompt would silently caption something else
                raise ValueError(f"prompt {prompt!r} has words not in the vocabulary: {unknown}")
            rows.append([tokenizer.bos_token_id] + encoding.ids)
        length = max(len(row) for row in rows)
        return {
            "input_ids": [[tokenizer.pad_token_id] * (length - len(row)) + row for row in rows],
            "attention_mask": [[0] * (length - len(row)) + [1] * len(row) for row in rows],
        }

    def _encode_captions(self, captions: list[str]) -> list[list[int]]:
        """Captions -> right-padded `words + [eos]` labels (-100 padding), cut to `max_caption_length` words."""
        eos, limit = self.tokenizer.eos_token_id, self.max_caption_length
        rows = self.tokenizer(captions, add_special_tokens=False)["input_ids"]
        num_truncated = sum(len(row) > limit for row in rows)
        if num_truncated:
            warnings.warn(
                f"{num_truncated} of {len(rows)} captions had more than max_caption_length={limit} words and were "
                "truncated (eos kept)",
                stacklevel=3,
            )
        rows = [row[:limit] + [eos] for row in rows]
        length = max(len(row) for row in rows)
        return [row + [-100] * (length - len(row)) for row in rows]

    def decode(self, token_ids, skip_special_tokens: bool = True, **kwargs) -> str:
        """Ids (T,) -> caption. With `skip_special_tokens`, stop at the first eos and drop bos, pad and -100
        (so `labels` decode too); unk is kept, as in the reference evaluations. Otherwise decode every id."""
        if token_ids is None or isinstance(token_ids, (str, bytes)):
            raise TypeError(f"decode takes a sequence of token ids, got {type(token_ids).__name__}")
        ids = token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids)
        tokenizer = self.tokenizer
        outside = [i for i in ids if not isinstance(i, (int, np.integer)) or not (0 <= i < len(tokenizer) or i == -100)]
        if outside:
            raise ValueError(f"token ids outside the vocabulary [0, {len(tokenizer)}): {outside[:5]}")
        if skip_special_tokens:
            if tokenizer.eos_token_id in ids:
                ids = ids[: ids.index(tokenizer.eos_token_id)]
            ids = [i for i in ids if i not in (tokenizer.bos_token_id, tokenizer.pad_token_id, -100)]
        else:
            ids = [tokenizer.pad_token_id if i == -100 else i for i in ids]
        return tokenizer.decode(ids, skip_special_tokens=False, **kwargs)

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """Ids (B, T) -> B captions (see `decode`)."""
        return [self.decode(row, skip_special_tokens=skip_special_tokens, **kwargs) for row in sequences]

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs) -> list[str]:
        """`generate` output (B, T) or (T,) -> list of B captions; called by the image-text-to-text pipeline."""
        if generated_outputs.ndim == 1:
            generated_outputs = generated_outputs[None]
        return self.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)
