"""hfcap: landmark image-captioning models as faithful Hugging Face models.

`import hfcap` registers every architecture of the registry (`hfcap.models.ARCHITECTURES`) with the Auto classes
(`AutoConfig`, `AutoModel` and `AutoModelForImageTextToText` return the generating class, `AutoProcessor` the
captioning processor), marks the classes as Hub remote code (every `save_pretrained` copies their source files and
writes `auto_map`), and makes `pipeline("image-to-text")` caption images given alone (`hfcap.pipelines`). Data,
metrics and training live in `hfcap.data`, `hfcap.metrics` and `hfcap.training`, imported on demand: the model,
processor and generation code need neither `datasets` nor `pycocoevalcap`.
"""

from .conversion import convert_checkpoint
from .generation import reference_beam_search
from .models import (
    ARCHITECTURES,
    ExpansionNetV2Config,
    ExpansionNetV2ForConditionalGeneration,
    M2TransformerConfig,
    M2TransformerForConditionalGeneration,
    ShowAttendTellConfig,
    ShowAttendTellForConditionalGeneration,
)
from .pipelines import register_pipeline
from .processing import CaptioningProcessor, build_word_level_tokenizer, load_image, tokenizer_from_vocabulary

__version__ = "0.1.0"

register_pipeline()  # pipeline("image-to-text") and ("image-text-to-text") caption images given alone


__all__ = [
    "ARCHITECTURES",
    "CaptioningProcessor",
    "ExpansionNetV2Config",
    "ExpansionNetV2ForConditionalGeneration",
    "M2TransformerConfig",
    "M2TransformerForConditionalGeneration",
    "ShowAttendTellConfig",
    "ShowAttendTellForConditionalGeneration",
    "build_word_level_tokenizer",
    "convert_checkpoint",
    "load_image",
    "reference_beam_search",
    "tokenizer_from_vocabulary",
]
