"""Tokenizer, image loading/processing and the captioning processor shared by all hfcap models."""

from .image_processing import make_image_processor
from .processing_captioning import CaptioningProcessor, ImageLoadError, load_image
from .tokenization import SPECIAL_TOKENS, build_word_level_tokenizer, tokenizer_from_vocabulary

__all__ = [
    "SPECIAL_TOKENS",
    "CaptioningProcessor",
    "ImageLoadError",
    "build_word_level_tokenizer",
    "load_image",
    "make_image_processor",
    "tokenizer_from_vocabulary",
]
