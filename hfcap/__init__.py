"""hfcap: landmark image-captioning models as faithful Hugging Face models.

`import hfcap` registers every hfcap architecture with the Auto classes (`AutoConfig`, `AutoModel` and
`AutoModelForImageTextToText` return the generating class, `AutoProcessor` the captioning processor), marks the
classes as Hub remote code (every `save_pretrained` copies their source files and writes `auto_map`), and makes
`pipeline("image-to-text")` caption images given alone (`hfcap.pipelines`). Data, metrics and training live in
`hfcap.data`, `hfcap.metrics` and `hfcap.training`, imported on demand: the model, processor and generation code
need neither `datasets` nor `pycocoevalcap`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .conversion import convert_checkpoint
from .generation import reference_beam_search
from .models import ShowAttendTellConfig, ShowAttendTellForConditionalGeneration
from .pipelines import register_pipeline
from .processing import CaptioningProcessor, build_word_level_tokenizer, load_image, tokenizer_from_vocabulary

__version__ = "0.1.0"

MODELS = {ShowAttendTellConfig: ShowAttendTellForConditionalGeneration}

for _config_class, _model_class in MODELS.items():
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModel.register(_config_class, _model_class, exist_ok=True)
    AutoModelForImageTextToText.register(_config_class, _model_class, exist_ok=True)
    AutoProcessor.register(_config_class, CaptioningProcessor, exist_ok=True)
    # Hub remote code: save_pretrained copies configuration_*.py / modeling_*.py and writes config.json's auto_map.
    _config_class.register_for_auto_class()
    _model_class.register_for_auto_class("AutoModelForImageTextToText")
CaptioningProcessor.register_for_auto_class()  # copies processing_captioning.py, auto_map in processor_config.json
register_pipeline()  # pipeline("image-to-text") and ("image-text-to-text") caption images given alone


__all__ = [
    "CaptioningProcessor",
    "ShowAttendTellConfig",
    "ShowAttendTellForConditionalGeneration",
    "build_word_level_tokenizer",
    "convert_checkpoint",
    "load_image",
    "reference_beam_search",
    "tokenizer_from_vocabulary",
]
