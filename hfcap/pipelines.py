"""Image captioning through 🤗 `pipeline`: `pipeline("image-to-text", model=DIR_OR_REPO)(image)`.

transformers 5 removed the "image-to-text" task: `pipeline("image-to-text")` logs a deprecation and builds the
"image-text-to-text" pipeline (`ImageTextToTextPipeline`), whose `__call__` raises "You must provide text" for an
image alone (transformers 5.17 has no redirect and rejects the name; `register_pipeline()` then declares it an
alias of "image-text-to-text"). A model's `config.custom_pipelines` cannot fix that for hfcap: transformers matches a
custom task before the "image-to-text" redirect, but then refuses to run it without `trust_remote_code=True`, even
for classes that are importable locally. So `register_pipeline()` (called by `import hfcap`) registers
`ImageCaptioningPipeline` as the implementation of "image-text-to-text" through the public `PIPELINE_REGISTRY`. Both
task names then build it. It subclasses `ImageTextToTextPipeline` and changes nothing unless the pipeline's
processor is a `CaptioningProcessor`; for every other model it is the stock pipeline. For hfcap models it:

- captions images given alone (a path, URL, PIL image, array or tensor, a list of them, a generator or dataset):
  the decoder prompt is "" (`[bos]`), so the caption is the model's own;
- fetches URLs with a timeout (`URL_TIMEOUT` unless the call passes `timeout=`) and reports network failures as a
  `RemoteFileError` naming the URL;
- loads every image with `CaptioningProcessor`'s `load_image` (every PIL mode converted correctly, EXIF orientation
  not applied as in the reference evaluations, unreadable files rejected with an `ImageLoadError` naming the file)
  instead of transformers' `load_images`;
- returns `[{"generated_text": caption}]` per image (no `input_text` when the prompt was empty); with
  `num_return_sequences=k`, k dicts per image.

Without hfcap installed (remote code), transformers' own pipeline is used:
`pipeline("image-text-to-text", model=repo, trust_remote_code=True)(image, text="")`.

What differs between transformers releases here (the alias, a malformed log record, how sequences are grouped) is
handled by `hfcap.compat`.
"""

import logging
from io import BytesIO

from huggingface_hub.utils import httpx  # the httpx module huggingface_hub ships (httpx2), as transformers uses
from PIL import Image
from transformers.pipelines import PIPELINE_REGISTRY, Pipeline
from transformers.pipelines.image_text_to_text import ImageTextToTextPipeline

from .compat import StrayWarningCategoryFilter, declare_image_to_text_alias, sequences_per_image
from .errors import RemoteFileError
from .processing.processing_captioning import CaptioningProcessor, ImageLoadError

TASK = "image-text-to-text"
URL_TIMEOUT = 30.0
"""Seconds the pipeline waits for a URL's server (connect and each read) when the call gives no `timeout`."""


def _fetch_url(image, timeout):
    """An http(s) URL -> the PIL image it serves (unconverted); anything else unchanged. Network failures raise a
    `RemoteFileError` naming the URL."""
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        try:
            response = httpx.get(image, timeout=URL_TIMEOUT if timeout is None else timeout, follow_redirects=True)
            response.raise_for_status()
        except httpx.HTTPError as error:
            raise RemoteFileError(f"cannot fetch {image}: {error}") from error
        try:
            return Image.open(BytesIO(response.content))
        except Image.UnidentifiedImageError:
            raise ImageLoadError(f"not an image (or an unsupported format): {image}") from None
    return image


class ImageCaptioningPipeline(ImageTextToTextPipeline):
    """`ImageTextToTextPipeline` that also captions images given without text (see the module docstring).

    Examples:
        ```python
        >>> import hfcap
        >>> from transformers import pipeline
        >>> captioner = pipeline("image-to-text", model="path/to/model")
        >>> captioner("dog.jpg")
        [{'generated_text': 'a dog running on the beach'}]
        >>> captioner(["dog.jpg", "cat.png"], batch_size=2, generate_kwargs={"num_beams": 3})
        [[{'generated_text': '...'}], [{'generated_text': '...'}]]
        ```
    """

    def __init__(self, *args, task: str = "", **kwargs):
        # transformers 5.17 reaches here with the alias "image-to-text" (see `register_pipeline`); 5.23 renames it.
        super().__init__(*args, task=TASK if task == "image-to-text" else task, **kwargs)

    @property
    def is_captioner(self) -> bool:
        """True when the processor is hfcap's `CaptioningProcessor`, i.e. "" prompts mean "caption from scratch"."""
        return isinstance(self.processor, CaptioningProcessor)

    def __call__(self, images=None, text=None, **kwargs):
        """Caption `images`: one image -> list of dicts; a list -> a list of such lists; a generator -> an iterator.
        With `text`, prompts (prefixes the captions must start with) as in `ImageTextToTextPipeline`."""
        if not self.is_captioner:
            return super().__call__(images, text=text, **kwargs)
        if images is None or (isinstance(images, (list, tuple)) and not images):
            raise ValueError("An image-captioning model needs images: pipe(image) or pipe(image, text=prompt).")
        if isinstance(images, dict) and "images" not in images:
            raise TypeError(f"a dict input needs an 'images' key (and optionally 'text'), got keys {sorted(images)}")
        if text is None:
            # Pipeline.__call__ runs a list/generator/dataset item by item (honouring batch_size); `preprocess`
            # turns each bare image into {"images": image, "text": ""}.
            return Pipeline.__call__(self, list(images) if isinstance(images, tuple) else images, **kwargs)
        return super().__call__(images, text=text, **kwargs)

    def preprocess(self, inputs=None, timeout=None, continue_final_message=None, **processing_kwargs):
        """One input (a bare image, or {"images": ..., "text": ...}) -> the processor's `pixel_values` and
        `input_ids` = [bos] + prompt; images are loaded by the processor, URLs fetched first."""
        if not self.is_captioner:
            return super().preprocess(inputs, timeout, continue_final_message, **processing_kwargs)
        if not isinstance(inputs, dict):
            inputs = {"images": inputs, "text": ""}
        images, text = inputs["images"], inputs.get("text", "")
        if isinstance(images, list):
            images = [_fetch_url(image, timeout) for image in images]
        else:
            images = _fetch_url(images, timeout)
        processor_kwargs = processing_kwargs.pop("processor_kwargs", None) or processing_kwargs
        model_inputs = self.processor(images=images, text=text, return_tensors="pt", **processor_kwargs)
        model_inputs = model_inputs.to(dtype=self.dtype)
        model_inputs["text"] = text
        return model_inputs

    def _forward(self, model_inputs, generate_kwargs=None):
        """`ImageTextToTextPipeline._forward`, with the sequences grouped per image, `(B, num_return_sequences, L)`,
        so that batches split per image (transformers 5.23 does this itself, 5.17 returns `(B * k, L)`)."""
        outputs = super()._forward(model_inputs, generate_kwargs)
        if self.is_captioner:
            outputs["generated_sequence"] = sequences_per_image(
                outputs["generated_sequence"], outputs["input_ids"].shape[0]
            )
        return outputs

    def postprocess(self, model_outputs, **postprocess_kwargs):
        """`ImageTextToTextPipeline.postprocess`, without the `input_text` of captions generated from no prompt, and
        one record per returned sequence (transformers 5.17's postprocess keeps only the first of each image's)."""
        sequences = model_outputs["generated_sequence"]
        if self.is_captioner and sequences.ndim == 3:
            per_image = sequences.shape[1]
            texts = model_outputs["prompt_text"]
            texts = [texts] if isinstance(texts, str) else texts
            model_outputs = {
                **model_outputs,
                "generated_sequence": sequences.flatten(0, 1),
                "prompt_text": [text for text in texts for _ in range(per_image)],
                "input_ids": model_outputs["input_ids"].repeat_interleave(per_image, dim=0),
            }
        records = super().postprocess(model_outputs, **postprocess_kwargs)
        if self.is_captioner:
            for record in records:
                if record.get("input_text") == "":
                    del record["input_text"]
        return records


def register_pipeline() -> None:
    """Make `ImageCaptioningPipeline` the implementation of "image-text-to-text" (and so of "image-to-text").

    Keeps the task's model classes and default model. Idempotent.
    """
    declare_image_to_text_alias(PIPELINE_REGISTRY)
    entry = PIPELINE_REGISTRY.supported_tasks[TASK]
    if entry["impl"] is ImageCaptioningPipeline:
        return
    logging.getLogger("transformers.pipelines").addFilter(StrayWarningCategoryFilter())
    registry_logger = logging.getLogger("transformers.pipelines.base")
    level = registry_logger.level
    registry_logger.setLevel(logging.ERROR)  # silence "already registered. Overwriting": replacing it is the point
    try:
        PIPELINE_REGISTRY.register_pipeline(
            TASK,
            pipeline_class=ImageCaptioningPipeline,
            pt_model=entry["pt"],
            default=entry.get("default"),
            type=entry.get("type"),
        )
    finally:
        registry_logger.setLevel(level)
    # register_pipeline also marks the class as a Hub custom pipeline, which would make `Pipeline.save_pretrained`
    # write `custom_pipelines` (needing trust_remote_code to load) for every model; this is the task's library
    # implementation, not custom code.
    del ImageCaptioningPipeline._registered_impl


__all__ = ["ImageCaptioningPipeline", "register_pipeline"]
