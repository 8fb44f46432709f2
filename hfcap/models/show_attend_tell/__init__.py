"""Show, Attend and Tell (Xu et al., ICML 2015) as a Hugging Face model."""

from .configuration_show_attend_tell import ShowAttendTellConfig
from .modeling_show_attend_tell import (
    ShowAttendTellDecoderState,
    ShowAttendTellForConditionalGeneration,
    ShowAttendTellPreTrainedModel,
)

__all__ = [
    "ShowAttendTellConfig",
    "ShowAttendTellDecoderState",
    "ShowAttendTellForConditionalGeneration",
    "ShowAttendTellPreTrainedModel",
]
