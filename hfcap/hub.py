"""Share hfcap models on the Hugging Face Hub: model, processor, generation config, remote code and model card.

CLI:    hfcap push DIR --repo-id ORG/NAME [--private] [--metrics metrics.json] [--weights converted|trained]
        [--source TEXT] [--dataset NAME] [--dataset-id HUB_ID] [--training-data TEXT] [--recipe TEXT]
        [--license ID] [--eval-dataset NAME] [--eval-dataset-id HUB_ID] [--commit-message TEXT]
Python: push_to_hub(model_dir, repo_id, ...) -> CommitInfo     everything in ONE commit (HfApi.upload_folder)
        model_card(config, generation_config, repo_id=..., provenance=..., evaluation=None) -> ModelCard
        reference_card(model_type) -> ModelCard                 the cards in model_cards/ (authors' weights)
        write_provenance(model_dir, **fields) -> Path           record how a model directory's weights were obtained

`model.push_to_hub(repo)` and `processor.push_to_hub(repo)` work as well: `import hfcap` registers the classes for
remote code, so every `save_pretrained` writes `auto_map` and copies the configuration/modeling/processing files.
`hfcap push` re-saves the model directory through those same `save_pretrained` calls (so the repo gets the current
remote code and only model files, not training leftovers), adds `hfcap_provenance.json` and the model card, and
uploads them in one commit.

Model cards are rendered from the single Jinja template `hfcap/model_card_template.md` (package data, so installed
copies of hfcap have it) with `ModelCard.from_template`; the rendered cards of the authors' weights are in the
repository's `model_cards/`.
Metadata: `library_name: transformers` (the repo loads with transformers' Auto classes and pipeline, through remote
code or hfcap's registration; with another library name `pipeline(model=repo_id)` refuses to infer the task and the
Hub shows no transformers snippet) plus the `hfcap` tag, `pipeline_tag: image-text-to-text` (transformers 5 and the
Hub no longer support "image-to-text"), `datasets`, and a `model-index` holding only results hfcap measured
(`--metrics`, the `metrics.json` of `hfcap evaluate`), described by the protocol that file records (`protocol`:
"coco", or "cider-d-only" for `hfcap evaluate --cider-only`). The original papers' results appear in a separate
table, labelled as theirs.

How the weights were obtained comes from `hfcap_provenance.json` in the model directory when present (keys: the
fields of `Provenance`; `hfcap convert` writes it, and `write_provenance` is the one writer), overridden by the CLI
flags; `weights="converted"` fills every other field with the architecture's facts about the authors' released
checkpoint.
"""

import argparse
import dataclasses
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from . import MODELS

TEMPLATE = Path(__file__).resolve().parent / "model_card_template.md"
PROVENANCE_FILE = "hfcap_provenance.json"
WEIGHTS = ("converted", "trained")
"""Values of `Provenance.weights`."""
METRICS = {
    "BLEU-1": "bleu",
    "BLEU-2": "bleu",
    "BLEU-3": "bleu",
    "BLEU-4": "bleu",
    "METEOR": "meteor",
    "ROUGE-L": "rouge",
    "CIDEr-D": "cider",
    "SPICE": "spice",
}
"""metrics.json key -> Hub metric id (`metrics` metadata and model-index `type`); the key is the result's `name`."""
REPO_FILE_PATTERNS = ["*.safetensors", "*.bin", "*.json", "*.py", "*.md"]
"""Files of an earlier push that this push deletes unless it re-uploads them (e.g. stale weight shards)."""

INTENDED_USE = (
    "Research and teaching: reproducing and studying a landmark image-captioning model, comparing it with newer "
    "systems under the same evaluation protocol, inspecting its attention over the image (`output_attentions=True`), "
    "and as a baseline or starting point for training on other caption data. It describes everyday photographs "
    "similar to its training images in short English sentences.\n\n"
    "Out of scope: descriptions that people rely on without checking (e.g. accessibility or safety-critical uses), "
    "inferring identity or sensitive attributes of people, surveillance, medical or other specialist images, and "
    "languages other than English."
)
EVALUATION_PROTOCOLS = {
    "coco": (
        "hfcap scores generated captions with the COCO caption evaluation code (pycocoevalcap): references and "
        "candidates go through the PTB tokenizer, then BLEU-1..4, METEOR, ROUGE-L and CIDEr-D (SPICE when its Java "
        "dependencies are installed) are computed against all reference captions of each image (`hfcap evaluate`). "
        "Scores are the raw pycocoevalcap values: BLEU, METEOR, ROUGE-L and SPICE in [0, 1], CIDEr-D unscaled; papers "
        "print them ×100."
    ),
    "cider-d-only": (
        "hfcap scored generated captions in its fast mode (`hfcap evaluate --cider-only`): corpus CIDEr-D only, "
        "computed as pycocoevalcap computes it (document frequencies from the evaluated images' references, all "
        "reference captions of each image) but on lowercased words with punctuation removed instead of the PTB "
        "tokenizer's tokens, so it is close to, not equal to, the COCO evaluation code's CIDEr-D; BLEU, METEOR, "
        "ROUGE-L and SPICE were not computed. CIDEr-D is unscaled; papers print it ×100."
    ),
    None: (
        "The metrics file these results come from does not record how they were computed (`hfcap evaluate` writes "
        "its protocol into metrics.json). hfcap's standard protocol is the COCO caption evaluation code "
        "(pycocoevalcap: PTB tokenizer, BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE) against all reference captions "
        "of each image."
    ),
}
"""metrics.json `protocol` -> how the card describes the evaluation; None: not recorded."""
GENERIC_LIMITATIONS = (
    "- The model reproduces the biases of its training captions. COCO captions over-represent some groups and "
    "scenes and describe people with stereotyped words (e.g. guessing gender from context, Hendricks et al. 2018); "
    "captioning models also mention objects that are not in the image (Rohrbach et al. 2018).\n"
    "- English only, with a closed word-level vocabulary: it cannot produce words outside it (rare words were "
    "mapped to `<unk>` during training).\n"
    "- Automatic metrics reward agreement with reference captions; they do not certify that a caption is correct."
)


@dataclass(frozen=True)
class Provenance:
    """How the weights were obtained (the file `hfcap_provenance.json` holds these fields).

    Args:
        weights: "converted" (from the original authors' released checkpoint) or "trained" (by hfcap).
        source: the checkpoint that was converted, or the training run.
        dataset: short name of the training data (also the default evaluation dataset).
        training_data: what the weights were trained on, in full.
        recipe: how they were trained.
        dataset_id: Hub dataset id of the training data, if there is one (card metadata `datasets`).
        license: license id of the weights.
    """

    weights: str
    source: str
    dataset: str
    training_data: str
    recipe: str
    dataset_id: str | None = None
    license: str = "apache-2.0"


PROVENANCE_FIELDS = tuple(field.name for field in dataclasses.fields(Provenance))
"""The keys `hfcap_provenance.json` may hold (and the `hfcap push` provenance flags)."""


@dataclass(frozen=True)
class ReportedResults:
    """A results table from the original authors' publication."""

    title: str
    note: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Architecture:
    """What a model card says about one architecture, independent of the particular weights."""

    name: str
    slug: str
    summary: str
    paper: dict
    reference_implementation: str
    reference_beam_search_note: str
    converted: Provenance
    reported: tuple[ReportedResults, ...]
    limitations: str
    citation: str


@dataclass(frozen=True)
class Evaluation:
    """An `hfcap evaluate` result: `metrics` (keys of `METRICS`), and how they were obtained (`protocol`: a key of
    `EVALUATION_PROTOCOLS`)."""

    metrics: dict
    split: str | None = None
    num_images: int | None = None
    generate_kwargs: dict = dataclasses.field(default_factory=dict)
    protocol: str | None = None


SHOW_ATTEND_TELL = Architecture(
    name="Show, Attend and Tell",
    slug="show-attend-tell",
    summary=(
        "Show, Attend and Tell captions an image with an LSTM that attends, at every word, over a grid of CNN "
        "features (soft attention). This is the model of the widely used PyTorch tutorial "
        "(sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning): CNN features (ResNet-101 in the tutorial) adaptively "
        "pooled to a 14×14 grid, additive attention with ReLU, a sigmoid gate on the context vector, an `LSTMCell` "
        "decoder and a linear output layer. The hfcap implementation computes exactly what the tutorial's code "
        "computes; the paper's own variants (tanh attention, scalar gate, deep output, hard attention) are "
        "configuration switches."
    ),
    paper={
        "title": "Show, Attend and Tell: Neural Image Caption Generation with Visual Attention",
        "url": "https://arxiv.org/abs/1502.03044",
        "authors": "Xu, Ba, Kiros, Cho, Courville, Salakhutdinov, Zemel and Bengio",
        "venue": "ICML 2015",
    },
    reference_implementation="[sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning]"
    "(https://github.com/sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning) (soft attention)",
    reference_beam_search_note=(
        " (the tutorial's `caption.py`: one image at a time, a beam that shrinks as hypotheses end, raw "
        "log-probability sums), which reproduces the tutorial's captions token for token"
    ),
    converted=Provenance(
        weights="converted",
        source=(
            "the tutorial author's released checkpoint `BEST_checkpoint_coco_5_cap_per_img_5_min_word_freq.pth.tar` "
            "and its word map `WORDMAP_coco_5_cap_per_img_5_min_word_freq.json`"
        ),
        dataset="COCO (Karpathy split)",
        dataset_id="yerevann/coco-karpathy",
        training_data=(
            "MS COCO 2014 images with the Karpathy splits: train + restval, 113,287 images, 5 captions per image "
            "(sampled with seed 123 where an image has more, duplicated where it has fewer), captions longer than 50 "
            "tokens dropped, the split's pre-tokenised lowercase tokens. Vocabulary: the 9,486 words occurring more "
            "than 5 times, counted over all splits (validation and test captions included), plus `<unk>`, `<start>`, "
            "`<end>` and `<pad>`."
        ),
        recipe=(
            "As described in the tutorial's README, in two stages. (1) Decoder only, with an ImageNet-pretrained "
            "ResNet-101 frozen: Adam, learning rate 4e-4, batch size 80, cross-entropy plus the doubly stochastic "
            "attention regulariser (weight 1), dropout 0.5 before the output layer, gradients clamped to ±5; the best "
            "of 20 epochs by validation BLEU-4 (epoch 13) was kept. (2) Fine-tuning ResNet layers 2-4 as well "
            "(encoder learning rate 1e-4), batch size 32, about 3 more epochs. Images are resized to 256×256 "
            "(aspect ratio not kept) and normalised with the ImageNet mean and standard deviation."
        ),
        license="mit",
    ),
    reported=(
        ReportedResults(
            title="Paper, Table 1 (COCO)",
            note=(
                "the paper's own model (VGG features, deep output, 10k-word vocabulary), not these weights; "
                "BLEU and METEOR ×100."
            ),
            columns=("attention", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR"),
            rows=(
                ("soft", "70.7", "49.2", "34.4", "24.3", "23.90"),
                ("hard", "71.8", "50.4", "35.7", "25.0", "23.04"),
            ),
        ),
        ReportedResults(
            title="Tutorial README (the converted checkpoint, Karpathy test split)",
            note=(
                "BLEU-4 ×100 computed with NLTK `corpus_bleu` against 5 references per image, which is not "
                "comparable to the COCO evaluation code's BLEU-4."
            ),
            columns=("beam size", "test BLEU-4", "val BLEU-4"),
            rows=(("1", "30.28", "29.98"), ("3", "33.06", "32.95"), ("5", "33.29", "33.17")),
        ),
    ),
    limitations=(
        "- Images are squashed to a square (256×256 in the tutorial) and described from a coarse feature grid "
        "(14×14); small objects and text in the image are often missed.\n"
        "- The tutorial built its vocabulary from all splits, test included, and selected its checkpoint with "
        "teacher-forced validation BLEU-4."
    ),
    citation=(
        "@inproceedings{xu2015show,\n"
        "  title     = {Show, Attend and Tell: Neural Image Caption Generation with Visual Attention},\n"
        "  author    = {Xu, Kelvin and Ba, Jimmy and Kiros, Ryan and Cho, Kyunghyun and Courville, Aaron and\n"
        "               Salakhutdinov, Ruslan and Zemel, Richard and Bengio, Yoshua},\n"
        "  booktitle = {Proceedings of the 32nd International Conference on Machine Learning},\n"
        "  series    = {Proceedings of Machine Learning Research},\n"
        "  volume    = {37},\n"
        "  pages     = {2048--2057},\n"
        "  year      = {2015}\n"
        "}"
    ),
)

ARCHITECTURES = {"show_attend_tell": SHOW_ATTEND_TELL}
"""model_type -> what its model cards say."""


def _architecture(model_type: str) -> Architecture:
    if model_type not in ARCHITECTURES:
        raise ValueError(f"no model-card information for model_type {model_type!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def read_metrics(path) -> Evaluation:
    """Read the `metrics.json` of `hfcap evaluate` ({"split", "num_images", "generate_kwargs", "protocol",
    "metrics": {...}}) or a flat {"BLEU-4": ..., "CIDEr-D": ...} dict (protocol not recorded). Raises ValueError for
    unknown keys, non-numeric values, an unknown protocol, or metrics that the protocol does not compute."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"metrics file not found: {path}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    summary = data if isinstance(data, dict) and isinstance(data.get("metrics"), dict) else {"metrics": data}
    metrics = summary["metrics"]
    if not isinstance(metrics, dict) or not metrics:
        raise ValueError(f"{path} holds no metrics (expected keys among {', '.join(METRICS)})")
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"{path}: unknown metric keys {unknown}; expected keys among {', '.join(METRICS)}")
    bad = [key for key, value in metrics.items() if isinstance(value, bool) or not isinstance(value, (int, float))]
    if bad:
        raise ValueError(f"{path}: metric values must be numbers: {', '.join(f'{k}={metrics[k]!r}' for k in bad)}")
    protocol = summary.get("protocol")
    if protocol not in EVALUATION_PROTOCOLS:
        known = ", ".join(repr(name) for name in EVALUATION_PROTOCOLS if name)
        raise ValueError(f"{path}: unknown protocol {protocol!r}; expected one of {known}")
    if protocol == "cider-d-only" and set(metrics) != {"CIDEr-D"}:
        raise ValueError(f"{path}: protocol 'cider-d-only' computes CIDEr-D alone, but the file has {sorted(metrics)}")
    return Evaluation(
        metrics={key: metrics[key] for key in METRICS if key in metrics},
        split=summary.get("split"),
        num_images=summary.get("num_images"),
        generate_kwargs=summary.get("generate_kwargs") or {},
        protocol=protocol,
    )


def write_provenance(model_dir, **fields) -> Path:
    """Write `hfcap_provenance.json` into `model_dir`: how its weights were obtained, for `hfcap push`'s model card.

    `fields` are `Provenance` fields: `weights` ("converted" or "trained") is required, "trained" needs `dataset`,
    None values are left out, and what is not given is filled in when the card is made (`resolve_provenance`).
    Replaces an existing file. Returns its path. Raises ValueError for unknown fields or values.
    """
    fields = {key: value for key, value in fields.items() if value is not None}
    unknown = sorted(set(fields) - set(PROVENANCE_FIELDS))
    if unknown:
        raise ValueError(f"unknown provenance fields {unknown}; known: {', '.join(PROVENANCE_FIELDS)}")
    if fields.get("weights") not in WEIGHTS:
        raise ValueError(f"provenance weights must be one of {', '.join(WEIGHTS)}, got {fields.get('weights')!r}")
    if fields["weights"] == "trained" and not fields.get("dataset"):
        raise ValueError("provenance of trained weights needs dataset (the training data's name)")
    not_text = sorted(key for key, value in fields.items() if not isinstance(value, str))
    if not_text:
        raise ValueError(f"provenance fields must be strings: {', '.join(f'{k}={fields[k]!r}' for k in not_text)}")
    path = Path(model_dir) / PROVENANCE_FILE
    path.write_text(json.dumps(fields, indent=2) + "\n", encoding="utf-8")
    return path


def resolve_provenance(model_dir, model_type: str, **overrides) -> Provenance:
    """`hfcap_provenance.json` of `model_dir` (if any) updated with the non-None `overrides` (fields of `Provenance`).

    `weights="converted"` takes every field not given from the architecture's released checkpoint; `"trained"` needs
    at least `dataset`. Raises ValueError naming what is missing.
    """
    values = {}
    provenance_file = Path(model_dir) / PROVENANCE_FILE
    if provenance_file.is_file():
        try:
            values = json.loads(provenance_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{provenance_file} is not valid JSON: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{provenance_file} must hold a JSON object")
        unknown = sorted(set(values) - set(PROVENANCE_FIELDS))
        if unknown:
            raise ValueError(f"{provenance_file}: unknown keys {unknown}")
    values.update({key: value for key, value in overrides.items() if value is not None})
    weights = values.get("weights")
    if weights == "converted":
        return dataclasses.replace(_architecture(model_type).converted, **values)
    if weights == "trained":
        if not values.get("dataset"):
            raise ValueError("--weights trained needs --dataset (the training data's name)")
        values.setdefault("source", "trained with `hfcap train`")
        values.setdefault("training_data", values["dataset"])
        values.setdefault("recipe", "Not recorded.")
        return Provenance(**values)
    raise ValueError(
        f"say how the weights in {model_dir} were obtained: --weights converted (the authors' checkpoint, through "
        f"`hfcap convert`) or --weights trained (by hfcap), or write {PROVENANCE_FILE} in the model directory "
        f"(got weights={weights!r})"
    )


def _model_details(config, generation_config) -> list[tuple[str, str]]:
    """(name, value) rows describing the architecture configuration and the generation defaults."""
    rows = [("Model class", f"`{MODELS[type(config)].__name__}`")]
    if getattr(config, "use_backbone", True) and getattr(config, "backbone", None):
        rows.append(("Visual backbone", f"timm `{config.backbone}`, inside the model (takes `pixel_values`)"))
    else:
        rows.append(("Visual backbone", "none: the model takes precomputed `visual_features`"))
    if getattr(config, "image_size", None):
        rows.append(("Input images", f"{config.image_size}×{config.image_size} pixels"))
    rows.append(("Vocabulary", f"{config.vocab_size} tokens"))
    defaults = ", ".join(
        f"`{name}={getattr(generation_config, name)}`"
        for name in ("num_beams", "max_new_tokens", "length_penalty")
        if getattr(generation_config, name, None) is not None
    )
    rows.append(("Generation defaults (`generation_config.json`)", defaults))
    return rows


def model_card(
    config,
    generation_config,
    *,
    repo_id: str,
    provenance: Provenance,
    evaluation: Evaluation | None = None,
    eval_dataset: str | None = None,
    eval_dataset_id: str | None = None,
) -> ModelCard:
    """Render the model card of an hfcap model from `TEMPLATE`.

    `evaluation` (hfcap's measured metrics) becomes the `model-index`, on `eval_dataset` / `eval_dataset_id`
    (default: the training dataset), and its `protocol` says how the card describes the evaluation (without
    `evaluation`: the COCO protocol hfcap uses). The original authors' results are rendered as their own tables,
    outside the model-index.
    """
    architecture = _architecture(config.model_type)
    if eval_dataset is None:
        eval_dataset, eval_dataset_id = provenance.dataset, eval_dataset_id or provenance.dataset_id
    eval_dataset_id = eval_dataset_id or eval_dataset
    eval_results = None
    if evaluation is not None:
        eval_results = [
            EvalResult(
                task_type="image-to-text",
                task_name="Image Captioning",
                dataset_type=eval_dataset_id,
                dataset_name=eval_dataset,
                dataset_split=evaluation.split,
                metric_type=METRICS[name],
                metric_name=name,
                metric_value=value,
            )
            for name, value in evaluation.metrics.items()
        ]
    card_data = ModelCardData(
        language="en",
        license=provenance.license,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=["image-captioning", "hfcap", architecture.slug],
        datasets=[provenance.dataset_id] if provenance.dataset_id else None,
        metrics=sorted(set(METRICS[name] for name in evaluation.metrics)) if evaluation else None,
        model_name=repo_id,
        eval_results=eval_results,
    )
    if provenance.weights == "converted":
        weights_summary = f"converted from {provenance.source}."
        provenance_text = (
            f"Converted from {provenance.source} with `hfcap convert {architecture.slug}`. The converter reads the "
            "checkpoint through an allowlisting unpickler (no code in it can run), maps every tensor onto the "
            "Hugging Face model and keeps the authors' token ids, so the model reproduces the original outputs; no "
            "weight was retrained."
        )
    else:
        weights_summary = f"trained by hfcap on {provenance.dataset}."
        provenance_text = f"Trained by hfcap ({provenance.source}) on {provenance.dataset}."
    measured_caption = None
    if evaluation is not None:
        settings = ", ".join(f"`{key}={value}`" for key, value in evaluation.generate_kwargs.items())
        measured_caption = (
            f"{eval_dataset}, {evaluation.split or 'unspecified'} split"
            + (f", {evaluation.num_images} images" if evaluation.num_images else "")
            + f"; decoding: {settings or 'the generation_config.json defaults'}."
        )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        title=f"{architecture.name} ({repo_id})",
        summary=architecture.summary,
        paper=architecture.paper,
        reference_implementation=architecture.reference_implementation,
        weights_summary=weights_summary,
        repo_id=repo_id,
        reference_beam_search_note=architecture.reference_beam_search_note,
        details=_model_details(config, generation_config),
        intended_use=INTENDED_USE,
        provenance_text=provenance_text,
        training_data=provenance.training_data,
        training_recipe=provenance.recipe,
        evaluation_protocol=EVALUATION_PROTOCOLS[evaluation.protocol if evaluation else "coco"],
        measured=[(name, f"{value:.4f}") for name, value in evaluation.metrics.items()] if evaluation else None,
        measured_caption=measured_caption,
        reported=architecture.reported,
        limitations=f"{GENERIC_LIMITATIONS}\n{architecture.limitations}",
        citation=architecture.citation,
    )


def reference_card(model_type: str) -> ModelCard:
    """The card of the architecture's converted original checkpoint, as `hfcap/<slug>` with its default config and
    generation defaults; `model_cards/<slug>.md` is this card (regenerate it with
    `reference_card(model_type).save(f"model_cards/{slug}.md")`)."""
    import torch

    architecture = _architecture(model_type)
    config_class = next(config_class for config_class in MODELS if config_class.model_type == model_type)
    with torch.device("meta"):  # the generation defaults are set in __init__; no weights needed
        model = MODELS[config_class](config_class())
    return model_card(
        model.config, model.generation_config, repo_id=f"hfcap/{architecture.slug}", provenance=architecture.converted
    )


def load_for_hub(model_dir):
    """`(model, processor)` of an hfcap `save_pretrained` directory, with a clear ValueError for anything else."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .processing import CaptioningProcessor

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"{model_dir} is not a directory")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{model_dir} has no config.json: not a save_pretrained model directory")
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    hfcap_types = sorted(config_class.model_type for config_class in MODELS)
    if model_type not in hfcap_types:
        raise ValueError(
            f"{model_dir} holds a {model_type!r} model, not an hfcap model "
            f"(hfcap model types: {', '.join(hfcap_types)})"
        )
    if not (model_dir / "processor_config.json").is_file():
        raise ValueError(
            f"{model_dir} has no processor (processor_config.json): save the model's CaptioningProcessor there with "
            "processor.save_pretrained(...); the Hub repo and the pipeline need it"
        )
    processor = AutoProcessor.from_pretrained(model_dir)
    if not isinstance(processor, CaptioningProcessor):
        raise ValueError(f"{model_dir}: expected a CaptioningProcessor, found {type(processor).__name__}")
    return AutoModelForImageTextToText.from_pretrained(model_dir), processor


def push_to_hub(
    model_dir,
    repo_id: str,
    *,
    private: bool = False,
    metrics=None,
    provenance: dict | None = None,
    eval_dataset: str | None = None,
    eval_dataset_id: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
):
    """Push the hfcap model in `model_dir` to `repo_id` in one commit: weights, config (with `auto_map`), generation
    config, processor, remote code, `hfcap_provenance.json` and the model card (README.md).

    Args:
        model_dir: a `save_pretrained` directory of an hfcap model and its processor.
        repo_id: "ORG/NAME"; created if needed.
        private: create the repository as private.
        metrics: path to an `hfcap evaluate` metrics.json; its values become the card's model-index.
        provenance: `Provenance` fields overriding the directory's `hfcap_provenance.json`.
        eval_dataset, eval_dataset_id: the dataset `metrics` were measured on (default: the training dataset).

    Returns:
        The `huggingface_hub.CommitInfo` of the commit.
    """
    model, processor = load_for_hub(model_dir)
    resolved = resolve_provenance(model_dir, model.config.model_type, **(provenance or {}))
    evaluation = read_metrics(metrics) if metrics is not None else None
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id  # "NAME" -> "USER/NAME"
    card = model_card(
        model.config,
        model.generation_config,
        repo_id=repo_id,
        provenance=resolved,
        evaluation=evaluation,
        eval_dataset=eval_dataset,
        eval_dataset_id=eval_dataset_id,
    )
    with tempfile.TemporaryDirectory(prefix="hfcap-push-") as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        write_provenance(staging, **dataclasses.asdict(resolved))
        card.save(Path(staging, "README.md"))
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=staging,
            commit_message=commit_message or f"Upload {resolved.weights} {model.config.model_type} model with hfcap",
            delete_patterns=REPO_FILE_PATTERNS,
        )


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `hfcap push`."""
    parser.add_argument("model_dir", metavar="DIR", help="save_pretrained directory of an hfcap model + processor")
    parser.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="Hub repository (created if needed)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--metrics", metavar="JSON", help="metrics.json of `hfcap evaluate`: the card's model-index")
    parser.add_argument("--eval-dataset", help="name of the dataset the metrics were measured on (default: --dataset)")
    parser.add_argument("--eval-dataset-id", help="its Hub dataset id, if any")
    provenance = parser.add_argument_group(
        "provenance", f"how the weights were obtained; override {PROVENANCE_FILE} in DIR"
    )
    provenance.add_argument("--weights", choices=WEIGHTS,
                            help="converted from the authors' checkpoint, or trained by hfcap")
    provenance.add_argument("--source", help="the checkpoint converted, or the training run")
    provenance.add_argument("--dataset", help="short name of the training data (required with --weights trained)")
    provenance.add_argument("--dataset-id", help="Hub dataset id of the training data")
    provenance.add_argument("--training-data", help="full description of the training data")
    provenance.add_argument("--recipe", help="how the weights were trained")
    provenance.add_argument("--license", help="license id of the weights")
    parser.add_argument("--commit-message", help="commit message (default: 'Upload ... with hfcap')")


def run(args: argparse.Namespace) -> int:
    """Run `hfcap push`; a bad model directory, provenance or metrics file, or a Hub error, prints one error line
    and returns 2."""
    provenance = {field: getattr(args, field) for field in PROVENANCE_FIELDS}
    try:
        commit = push_to_hub(
            args.model_dir,
            args.repo_id,
            private=args.private,
            metrics=args.metrics,
            provenance=provenance,
            eval_dataset=args.eval_dataset,
            eval_dataset_id=args.eval_dataset_id,
            commit_message=args.commit_message,
        )
    except (ValueError, OSError) as error:  # OSError: unreadable files, and the Hub's HTTP errors
        print(f"hfcap push: error: {error}", file=sys.stderr)
        return 2
    print(f"pushed {args.model_dir} -> {commit.commit_url}")
    return 0


__all__ = [
    "ARCHITECTURES",
    "Evaluation",
    "Provenance",
    "load_for_hub",
    "model_card",
    "push_to_hub",
    "read_metrics",
    "reference_card",
    "resolve_provenance",
    "write_provenance",
]
