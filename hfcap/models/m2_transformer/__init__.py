"""Meshed-Memory Transformer (M², Cornia et al., CVPR 2020) as a Hugging Face model."""

from .configuration_m2_transformer import M2TransformerConfig
from .modeling_m2_transformer import (
    GENERATION_DEFAULTS,
    M2TransformerForConditionalGeneration,
    M2TransformerPreTrainedModel,
    remove_consecutive_duplicate_words,
)

__all__ = [
    "GENERATION_DEFAULTS",
    "M2TransformerConfig",
    "M2TransformerForConditionalGeneration",
    "M2TransformerPreTrainedModel",
    "remove_consecutive_duplicate_words",
]
