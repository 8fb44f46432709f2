"""The one loader of saved hfcap model directories (`hfcap caption`, `hfcap evaluate`, `hfcap push`, the trainer's
`model.init_from`), with one set of checks.

    load_captioner(model_dir, device="cpu") -> (model, processor)

A directory must hold an hfcap architecture's `config.json`, its weights (`model.safetensors`, or a sharded index)
and its `CaptioningProcessor`. Every weight the model has must come from the file, and every tensor in the file must
have a place of the right size in the model: a model saved features-only and loaded with a backbone, or a
`config.json` that switches on layers the weights lack, is refused instead of captioning with random layers. The one
exception is a backbone that the config says comes from timm's pretrained weights (`use_pretrained_backbone`), which
is then loaded from there. Every problem is a `ModelDirectoryError` (a `ValueError`) or a `FileNotFoundError` that
names the directory or file.
"""

import json
from pathlib import Path

from .errors import ModelDirectoryError, configuration_errors
from .models import ARCHITECTURES

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def _read_config(directory: Path):
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelDirectoryError(f"{directory} has no config.json: not a save_pretrained model directory")
    try:
        values = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelDirectoryError(f"{config_file} is not valid JSON: {error}") from error
    model_type = values.get("model_type") if isinstance(values, dict) else None
    if model_type not in ARCHITECTURES:
        raise ModelDirectoryError(f"{directory} holds a {model_type!r} model, not an hfcap model (hfcap's model "
                                  f"types: {', '.join(ARCHITECTURES)})")
    architecture = ARCHITECTURES[model_type]
    try:
        with configuration_errors(str(config_file)):
            return architecture, architecture.config_class.from_pretrained(directory)
    except (TypeError, ValueError) as error:
        raise ModelDirectoryError(f"{config_file} is not a valid {model_type} configuration: {error}") from error


def _load_pretrained_backbone(model, missing: list[str]) -> list[str]:
    """Fill the backbone weights the checkpoint lacks from timm's pretrained weights, when the config asks for them;
    returns the keys still missing."""
    prefix = next((name.rpartition("backbone.")[0] + "backbone." for name in missing if ".backbone." in f".{name}"),
                  None)
    if prefix is None or not model.config.use_pretrained_backbone:
        return missing
    # Built off the meta device, a model of this config creates its backbone with timm's pretrained weights.
    model.backbone.load_state_dict(type(model)(model.config).backbone.state_dict())
    return [name for name in missing if not name.startswith(prefix)]


def load_captioner(model_dir, device="cpu"):
    """`(model, processor)` of an hfcap `save_pretrained` directory, the model in eval mode on `device`; see the
    module doc for what is checked."""
    from safetensors import SafetensorError

    from .processing import CaptioningProcessor

    directory = Path(model_dir)
    if not directory.exists():
        raise FileNotFoundError(f"model directory not found: {directory}")
    if not directory.is_dir():
        raise ModelDirectoryError(f"{directory} is not a directory (a model is a save_pretrained directory)")
    architecture, config = _read_config(directory)
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise ModelDirectoryError(f"{directory} has no weights ({' or '.join(WEIGHT_FILES)})")
    try:
        processor = CaptioningProcessor.from_pretrained(directory)
    except (OSError, ValueError, TypeError) as error:
        raise ModelDirectoryError(f"{directory} has no loadable CaptioningProcessor: {error}") from error
    if len(processor.tokenizer) > config.vocab_size:
        raise ModelDirectoryError(f"{directory}: the tokenizer has {len(processor.tokenizer)} tokens but the model "
                                  f"only {config.vocab_size}")
    try:
        model, info = architecture.model_class.from_pretrained(directory, config=config, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise ModelDirectoryError(f"cannot load the weights of {directory}: {' '.join(str(error).split())}") from error
    missing = _load_pretrained_backbone(model, list(info["missing_keys"]))
    problems = {
        "missing from the weights": missing,
        "in the weights but not in the model": list(info["unexpected_keys"]),
        "of the wrong size": [str(entry[0]) if isinstance(entry, tuple) else str(entry)
                              for entry in info.get("mismatched_keys", [])],
    }
    problems = {what: keys for what, keys in problems.items() if keys}
    if problems:
        details = "; ".join(f"{len(keys)} tensors {what} (e.g. {', '.join(sorted(keys)[:3])})"
                            for what, keys in problems.items())
        raise ModelDirectoryError(f"the weights in {directory} do not fit its config.json: {details}")
    return model.to(device).eval(), processor


__all__ = ["WEIGHT_FILES", "load_captioner"]
