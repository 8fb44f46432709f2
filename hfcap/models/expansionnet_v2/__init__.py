"""ExpansionNet v2 (Hu, Cavicchioli and Capotondi, BigData 2023) as a Hugging Face model."""

from .configuration_expansionnet_v2 import ExpansionNetV2Config
from .modeling_expansionnet_v2 import (
    ExpansionNetV2DecoderState,
    ExpansionNetV2ForConditionalGeneration,
    ExpansionNetV2PreTrainedModel,
    ExpansionNetV2StaticDecoderState,
)

__all__ = [
    "ExpansionNetV2Config",
    "ExpansionNetV2DecoderState",
    "ExpansionNetV2ForConditionalGeneration",
    "ExpansionNetV2PreTrainedModel",
    "ExpansionNetV2StaticDecoderState",
]
