"""The registry of hfcap architectures: each is listed once, with what shared code needs to know about it.

Adding an architecture = its model folder (self-contained `configuration_*.py` / `modeling_*.py`, shipped as Hub
remote code, plus `card.py` with its `CARD_FACTS`), its converter module in `hfcap.conversion`, and one
entry in the tuple registered below. `import hfcap` runs these calls; the package root, the converter dispatch,
the CLI, the trainer, the loader and the model cards all read `ARCHITECTURES`.
"""

import importlib
import inspect
from dataclasses import dataclass

from .expansionnet_v2 import ExpansionNetV2Config, ExpansionNetV2ForConditionalGeneration
from .m2_transformer import M2TransformerConfig, M2TransformerForConditionalGeneration
from .show_attend_tell import ShowAttendTellConfig, ShowAttendTellForConditionalGeneration


@dataclass(frozen=True)
class Architecture:
    """One hfcap architecture.

    Args:
        model_type: the config's `model_type` (`config.json`'s key).
        cli_name: its name on the command line (`hfcap convert <cli_name>`, `hfcap train` configs accept both).
        config_class, model_class: the `PreTrainedConfig` and the generating `PreTrainedModel` classes.
        converter: module path of its converter from the authors' checkpoint (`convert`, `add_arguments`,
            `OVERRIDES`, `READS`), or None.
        card: module path holding its `CARD_FACTS` (what model cards say about it), or None.
    """

    model_type: str
    cli_name: str
    config_class: type
    model_class: type
    converter: str | None = None
    card: str | None = None

    @property
    def generation_defaults(self) -> dict:
        """The `GENERATION_DEFAULTS` constant of its modeling file (what `__init__` writes into `generation_config`)."""
        return dict(inspect.getmodule(self.model_class).GENERATION_DEFAULTS)

    def card_facts(self) -> dict:
        if self.card is None:
            raise ValueError(f"no model-card facts for {self.model_type!r}")
        return importlib.import_module(self.card).CARD_FACTS


ARCHITECTURES: dict[str, Architecture] = {}
"""model_type -> Architecture, in registration order."""


def register_architecture(architecture: Architecture) -> None:
    """List `architecture` and register it with transformers: `AutoConfig`, `AutoModel` and
    `AutoModelForImageTextToText` (the generating class), `AutoProcessor` (hfcap's `CaptioningProcessor`), and as
    Hub remote code (every `save_pretrained` copies its configuration/modeling files and writes `auto_map`)."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    from ..processing import CaptioningProcessor

    config_class, model_class = architecture.config_class, architecture.model_class
    if config_class.model_type != architecture.model_type:
        raise ValueError(f"{config_class.__name__}.model_type is {config_class.model_type!r}, not "
                         f"{architecture.model_type!r}")
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, model_class, exist_ok=True)
    AutoModelForImageTextToText.register(config_class, model_class, exist_ok=True)
    AutoProcessor.register(config_class, CaptioningProcessor, exist_ok=True)
    config_class.register_for_auto_class()
    model_class.register_for_auto_class("AutoModelForImageTextToText")  # save_pretrained adds AutoModel itself
    CaptioningProcessor.register_for_auto_class()  # copies processing_captioning.py, auto_map in processor_config.json
    ARCHITECTURES[architecture.model_type] = architecture


def get_architecture(name: str) -> Architecture:
    """The architecture whose `model_type` or `cli_name` is `name` (underscores and hyphens alike)."""
    for architecture in ARCHITECTURES.values():
        if name.replace("-", "_") in (architecture.model_type, architecture.cli_name.replace("-", "_")):
            return architecture
    known = ", ".join(architecture.cli_name for architecture in ARCHITECTURES.values())
    raise ValueError(f"unknown architecture {name!r}; hfcap has: {known}")


for _architecture in (
    Architecture("show_attend_tell", "show-attend-tell", ShowAttendTellConfig, ShowAttendTellForConditionalGeneration,
                 converter="hfcap.conversion.show_attend_tell", card="hfcap.models.show_attend_tell.card"),
    Architecture("m2_transformer", "m2-transformer", M2TransformerConfig, M2TransformerForConditionalGeneration,
                 converter="hfcap.conversion.m2_transformer", card="hfcap.models.m2_transformer.card"),
    Architecture("expansionnet_v2", "expansionnet-v2", ExpansionNetV2Config, ExpansionNetV2ForConditionalGeneration,
                 converter="hfcap.conversion.expansionnet_v2", card="hfcap.models.expansionnet_v2.card"),
):
    register_architecture(_architecture)

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "ExpansionNetV2Config",
    "ExpansionNetV2ForConditionalGeneration",
    "M2TransformerConfig",
    "M2TransformerForConditionalGeneration",
    "ShowAttendTellConfig",
    "ShowAttendTellForConditionalGeneration",
    "get_architecture",
    "register_architecture",
]
