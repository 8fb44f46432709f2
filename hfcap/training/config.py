"""Training configuration: one ``TrainingConfig`` dataclass, read from YAML/JSON and dotted ``key=value`` overrides.

A config file mirrors the dataclasses below (see ``examples/configs/*.yaml``)::

    output_dir: outputs/scenes_default
    data: {name: scenes, num_train: 10000, max_train_images: 3000}
    processor: {image_size: 64, min_word_frequency: 5, max_caption_length: 20}
    model: {type: show_attend_tell, config: {...}}        # or init_from: DIR (a save_pretrained directory)
    stages:                                               # run in order; each is cross-entropy (xe) or SCST
      - {name: xe, type: xe, epochs: 10, lr: 4.0e-4, clip_grad_value: 5.0}
      - {name: scst, type: scst, epochs: 2, lr: 5.0e-5, baseline: mean_of_others, num_samples: 5}
    validation: {num_beams: 1, max_images: 200}
    test: {num_beams: 3}

Overrides use dotted paths; a stage is addressed by its name or index and values are parsed as YAML:
``xe.lr=1e-3`` is short for ``stages.xe.lr=1e-3``; ``data.max_train_images=40``; ``stages.1.epochs=0``.
Unknown keys and bad values raise a ``ValueError`` naming the key.
"""

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from hfcap.data.sources import DataSource

OPTIMIZERS = ("adam", "adamw", "radam")
SCHEDULES = ("constant", "noam", "linear", "plateau", "warmup_anneal")
MIXED_PRECISION = ("no", "bf16", "fp16")
XE_CAPTIONS = ("pairs", "one_per_image", "grouped")


@dataclass
class DataConfig(DataSource):
    """Where the (image, captions) data comes from (``hfcap.data.sources.DataSource``: ``name`` scenes | karpathy |
    coco | folder and its settings), and which part of it is used.

    ``visual_features_dir``: a feature cache (``hfcap.training.feature_cache``; e.g. M²'s bottom-up region features
    imported with ``hfcap data regions``) that every stage, validation and the test read instead of the images.
    ``max_*_images`` keep the first N images of a split (``None`` = all). ``xe_captions`` (XE stages):
      - ``pairs``: one row per (image, caption) pair (every caption once per epoch; the M² recipe);
      - ``one_per_image``: one row per image with one of its captions, drawn afresh every epoch (the SAT tutorial
        iterates over pairs; this is 5x cheaper per epoch on COCO);
      - ``grouped``: one row per image with all its captions; the image is encoded once and its features repeated
        for each caption (self-critical.pytorch's ``seq_per_img``), so ``batch_size`` counts images.
    """

    visual_features_dir: str | None = None
    max_train_images: int | None = None
    max_val_images: int | None = None
    max_test_images: int | None = None
    xe_captions: str = "pairs"
    num_workers: int = 0


@dataclass
class ProcessorConfig:
    """The processor built for a new model: image size/resampling and the word-level vocabulary from train captions.

    Ignored with ``model.init_from`` when that directory already holds a processor.
    """

    image_size: int = 224
    resample: str = "bilinear"
    min_word_frequency: int = 5
    max_caption_length: int = 50


@dataclass
class ModelConfig:
    """``type`` (an architecture of the registry: model type or CLI name) + ``config`` (keyword arguments of its
    config class) builds a new, randomly initialised model; ``init_from`` loads a ``save_pretrained`` directory (e.g. a
    converted checkpoint) instead. The vocabulary and special ids always come from the processor."""

    type: str = "show_attend_tell"
    config: dict[str, typing.Any] = field(default_factory=dict)
    init_from: str | None = None


@dataclass
class StageConfig:
    """One training stage: ``type: xe`` (teacher-forced cross-entropy) or ``type: scst`` (self-critical sequence
    training).

    Optimisation: ``optimizer`` adam | adamw | radam (``torch.optim.RAdam``, which takes SGD-like steps while the
    variance estimate is unreliable, where ExpansionNet v2's copy skips them) with ``lr``, ``betas``, ``eps``,
    ``weight_decay``;
    ``backbone_lr`` gives the visual backbone (parameters named ``*.backbone.*``) its own learning rate.
    ``schedule``:
      - ``constant``;
      - ``noam``: lr · d^-0.5 · min(s^-0.5, s · warmup^-1.5), s = step + 1 (Vaswani et al.; M²: lr 1, d 512);
      - ``linear``: linear warmup over ``warmup_steps`` then linear decay to 0 at the last step;
      - ``plateau``: lr × ``plateau_factor`` after every ``plateau_patience`` epochs without a better validation
        CIDEr-D (the Show-Attend-Tell tutorial: ×0.8 after 8 epochs);
      - ``warmup_anneal``: ExpansionNet v2's lr / max(warmup − s, 1) · γ^⌊epoch / anneal_every_epochs⌋, floored
        at ``min_lr`` after the warmup.
    Clipping: ``clip_grad_norm`` (global norm) or ``clip_grad_value`` (element-wise clamp, the SAT tutorial's ±5).
    ``patience``: stop the stage after that many validations without a better CIDEr-D (``None`` = never).
    ``max_steps`` caps the optimizer steps of the stage (``None`` = ``epochs`` full epochs).
    ``trainable_backbone_stages``: how many of the backbone's last timm feature stages train in this stage (0 freezes
    the backbone, the SAT tutorial's fine-tuning is 3; ``None``: all of it; ``hfcap.training.freezing``).
    ``label_smoothing``: of the XE loss (passed to the model's loss per call, never saved with the model).
    ``init_from_best``: start the stage from the best checkpoint of the previous stage (M²'s switch to SCST).
    ``cached_features``: train on backbone-stage features (``model.get_image_features``) computed once at the start
    of the stage (``hfcap.training.feature_cache``): the backbone is frozen, the encoder's layers train as usual.
    SCST only (see ``hfcap.training.scst``): ``baseline`` greedy | mean_of_others | beam_mean, ``num_samples``
    captions per image (samples, or beams for ``beam_mean``), ``include_eos`` (EOS counts as a word in the CIDEr-D
    reward), ``df_mode`` per_image | per_caption (CIDEr-D document frequencies), ``normalisation`` token | sequence |
    max_length (of the policy-gradient loss), ``max_new_tokens``, and the sampling call's extra ``generate_kwargs``
    (``reference_beam_search: true`` samples with the authors' beam search: M²'s beam SCST).
    """

    name: str = "xe"
    type: str = "xe"
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    optimizer: str = "adam"
    lr: float = 4e-4
    backbone_lr: float | None = None
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    noam_model_dim: int = 512
    plateau_patience: int = 8
    plateau_factor: float = 0.8
    anneal_every_epochs: int = 1
    anneal_factor: float = 1.0
    min_lr: float = 0.0
    clip_grad_norm: float | None = None
    clip_grad_value: float | None = None
    label_smoothing: float = 0.0
    patience: int | None = None
    cached_features: bool = False
    trainable_backbone_stages: int | None = None
    init_from_best: bool = False
    baseline: str = "mean_of_others"
    num_samples: int = 5
    include_eos: bool = True
    df_mode: str = "per_image"
    normalisation: str = "token"
    max_new_tokens: int = 20
    generate_kwargs: dict[str, typing.Any] = field(default_factory=dict)
    reference_beam_search: bool = False


@dataclass
class EvalConfig:
    """Decoding and subset for an evaluation (validation during training, or the final test).

    ``full_metrics`` (test only): the COCO metrics (BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE when available; needs
    Java), or ``False`` for corpus CIDEr-D alone. Validation always uses CIDEr-D alone. ``generate_kwargs``: further
    ``generate`` arguments (e.g. ``length_penalty``); ``reference_beam_search``: decode with the authors' beam search;
    ``remove_consecutive_duplicates``: M²'s evaluation post-processing of the captions before scoring.
    The test decoding also becomes the saved model's ``generation_config``.
    """

    num_beams: int = 1
    max_new_tokens: int = 20
    batch_size: int = 64
    max_images: int | None = None
    full_metrics: bool = True
    generate_kwargs: dict[str, typing.Any] = field(default_factory=dict)
    reference_beam_search: bool = False
    remove_consecutive_duplicates: bool = False


@dataclass
class TrainingConfig:
    """Everything a training run needs; see the module docstring for the file format.

    ``validate_every_steps``: also validate every N optimizer steps (besides each epoch end); ``save_every_steps``:
    checkpoint every N optimizer steps (besides each epoch end). ``num_threads``: torch CPU threads per process
    (``None`` = the machine's cores divided by the number of processes). ``report_to``: accelerate trackers
    (``tensorboard``) besides the always-written ``log.jsonl``. ``attention_maps``: test images drawn with their
    attention maps at the end. ``max_checkpoints``: how many checkpoints to keep (the newest).
    """

    output_dir: str = "outputs/run"
    seed: int = 0
    mixed_precision: str = "no"
    num_threads: int | None = None
    data: DataConfig = field(default_factory=DataConfig)
    processor: ProcessorConfig = field(default_factory=ProcessorConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    validation: EvalConfig = field(default_factory=EvalConfig)
    test: EvalConfig = field(default_factory=lambda: EvalConfig(num_beams=3))
    validate_every_steps: int | None = None
    save_every_steps: int | None = 500
    max_checkpoints: int = 2
    log_every_steps: int = 10
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    attention_maps: int = 4

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raise ``ValueError`` naming the first inconsistent setting."""
        from .scst import BASELINES, DF_MODES, NORMALISATIONS

        from hfcap.models import get_architecture

        self.data.check("data")
        _choice("data.xe_captions", self.data.xe_captions, XE_CAPTIONS)
        _choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        if self.data.name == "coco" and not {"train", "val"} <= set(self.data.annotations):
            raise ValueError("data.name=coco needs data.annotations with at least 'train' and 'val' files")
        for key in ("max_train_images", "max_val_images", "max_test_images"):
            if getattr(self.data, key) is not None and getattr(self.data, key) < 1:
                raise ValueError(f"data.{key} must be >= 1 (or null for all), got {getattr(self.data, key)}")
        if self.processor.image_size < 8 or self.processor.max_caption_length < 1:
            raise ValueError("processor.image_size must be >= 8 and processor.max_caption_length >= 1")
        if not self.model.init_from:
            if not self.model.type:
                raise ValueError("model: give either model.type (+ model.config) or model.init_from")
            config_class = get_architecture(self.model.type).config_class  # unknown: an error naming the known ones
            fields = {field.name for field in dataclasses.fields(config_class)}
            for key in self.model.config:  # transformers keeps unknown keys silently: a typo would change nothing
                if key not in fields:
                    close = difflib.get_close_matches(key, fields, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ValueError(f"model.config.{key} is not a {config_class.__name__} setting{hint}")
        if not self.stages:
            raise ValueError("stages: at least one training stage is needed")
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stages: stage names must be unique, got {names}")
        for stage in self.stages:
            where = f"stages.{stage.name}"
            _choice(f"{where}.type", stage.type, ("xe", "scst"))
            _choice(f"{where}.optimizer", stage.optimizer, OPTIMIZERS)
            _choice(f"{where}.schedule", stage.schedule, SCHEDULES)
            _choice(f"{where}.baseline", stage.baseline, BASELINES)
            _choice(f"{where}.df_mode", stage.df_mode, DF_MODES)
            _choice(f"{where}.normalisation", stage.normalisation, NORMALISATIONS)
            for key in ("epochs", "batch_size", "gradient_accumulation_steps", "num_samples", "max_new_tokens"):
                minimum = 0 if key == "epochs" else 1
                if getattr(stage, key) < minimum:
                    raise ValueError(f"{where}.{key} must be >= {minimum}, got {getattr(stage, key)}")
            if stage.lr <= 0:
                raise ValueError(f"{where}.lr must be positive, got {stage.lr}")
            if len(stage.betas) != 2:
                raise ValueError(f"{where}.betas must be two numbers, got {stage.betas}")
            if stage.clip_grad_norm is not None and stage.clip_grad_value is not None:
                raise ValueError(f"{where}: set clip_grad_norm or clip_grad_value, not both")
            if not 0.0 <= stage.label_smoothing < 1.0:
                raise ValueError(f"{where}.label_smoothing must be in [0, 1), got {stage.label_smoothing}")
            if stage.schedule in ("noam",) and stage.warmup_steps < 1:
                raise ValueError(f"{where}: schedule noam needs warmup_steps >= 1")
            if stage.type == "scst" and stage.baseline == "mean_of_others" and stage.num_samples < 2:
                raise ValueError(f"{where}: the mean_of_others baseline needs num_samples >= 2")
            if stage.type == "scst" and stage.label_smoothing:
                raise ValueError(f"{where}: label_smoothing applies to xe stages only")
            if stage.cached_features and self.data.visual_features_dir:
                raise ValueError(f"{where}.cached_features: the whole run already reads data.visual_features_dir")
            if stage.trainable_backbone_stages is not None and stage.trainable_backbone_stages < 0:
                raise ValueError(f"{where}.trainable_backbone_stages must be >= 0 (or null for all)")
        for where, settings in (("validation", self.validation), ("test", self.test)):
            for key in ("num_beams", "max_new_tokens", "batch_size"):
                if getattr(settings, key) < 1:
                    raise ValueError(f"{where}.{key} must be >= 1, got {getattr(settings, key)}")
            if settings.max_images is not None and settings.max_images < 1:
                raise ValueError(f"{where}.max_images must be >= 1 (or null for all), got {settings.max_images}")
        for key in ("save_every_steps", "validate_every_steps", "log_every_steps", "max_checkpoints"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        unknown = set(self.report_to) - {"tensorboard"}
        if unknown:
            raise ValueError(f"report_to: unsupported tracker(s) {sorted(unknown)}; log.jsonl is always written")

    def stage(self, name: str) -> StageConfig:
        """The stage called ``name``."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage named {name!r}; stages are {[s.name for s in self.stages]}")

    def to_dict(self) -> dict:
        """A plain, JSON-serialisable dict (the inverse of ``from_dict``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainingConfig":
        """Build from a nested dict; unknown keys and wrongly typed values raise ``ValueError``."""
        return _build(cls, values, "")

    @classmethod
    def load(cls, path=None, overrides=()) -> "TrainingConfig":
        """Read a YAML/JSON file (``None`` = all defaults) and apply ``key=value`` overrides (see module docstring)."""
        values = read_config_file(path) if path is not None else {}
        for override in overrides:
            apply_override(values, override)
        return cls.from_dict(values)


def read_config_file(path) -> dict:
    """The nested dict stored in a ``.yaml``/``.yml``/``.json`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        values = json.loads(text)
    else:
        import yaml

        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: the top level of a config must be a mapping, got {type(values).__name__}")
    return values


def apply_override(values: dict, override: str) -> None:
    """Apply one ``dotted.key=value`` override to the nested dict ``values`` in place (value parsed as YAML)."""
    import yaml

    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ValueError(f"override {override!r} must look like key=value (e.g. stages.xe.lr=1e-3)")
    value = yaml.safe_load(raw) if raw.strip() else None
    parts = key.split(".")
    stage_names = [s.get("name", StageConfig.name) for s in values.get("stages", [])]
    if parts[0] != "stages" and parts[0] in stage_names:
        parts = ["stages"] + parts
    node = values
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_stage_index(node, part, ".".join(parts[: depth + 1]))]
            continue
        if part == "stages" and "stages" not in node:
            node["stages"] = [dataclasses.asdict(StageConfig())]
        node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ValueError(f"override {override!r}: {'.'.join(parts[: depth + 1])} is not a section")
    if isinstance(node, list):
        raise ValueError(f"override {override!r}: name a field of the stage, e.g. stages.xe.lr=1e-3")
    node[parts[-1]] = value


def _stage_index(stages: list, part: str, where: str) -> int:
    if part.isdigit() and int(part) < len(stages):
        return int(part)
    for index, stage in enumerate(stages):
        if stage.get("name", StageConfig.name) == part:
            return index
    raise ValueError(f"{where}: no stage with that index or name; stages are "
                     f"{[s.get('name', StageConfig.name) for s in stages]}")


def _choice(key, value, allowed):
    if value not in allowed:
        raise ValueError(f"{key} must be one of {list(allowed)}, got {value!r}")


def _build(cls, values, prefix):
    """Instantiate dataclass ``cls`` from ``values``, checking keys and value types recursively."""
    if not isinstance(values, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown config key {prefix + key!r}{hint}")
        kwargs[key] = _convert(hints[key], value, prefix + key)
    return cls(**kwargs)


def _convert(hint, value, key):
    """Check ``value`` against the type ``hint`` (ints are accepted for floats); return it converted."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{key} must be a list, got {value!r}")
        (inner,) = args
        if dataclasses.is_dataclass(inner):
            return [_build(inner, item, f"{key}.{item.get('name', i) if isinstance(item, dict) else i}.")
                    for i, item in enumerate(value)]
        return [_convert(inner, item, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if hint is typing.Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"{key} must be of type {hint.__name__}, got {value!r}")
    return value
