"""Model cards of hfcap models, rendered from one Jinja template (`hfcap/model_card_template.md`, package data).

    model_card(config, generation_defaults, repo_id=..., provenance=..., evaluation=None, image_size=None)
    reference_card(model_type) -> ModelCard        the card of the authors' converted checkpoint (model_cards/)
    read_metrics(path) -> Evaluation               the metrics.json of `hfcap evaluate`

What a card says about an architecture comes from its `card.py` (`CARD_FACTS`, read through the registry); the
original papers' results appear in their own tables, labelled as theirs. Metadata: `library_name: transformers` (the
repo loads with transformers' Auto classes and pipeline, through remote code or hfcap's registration; with another
library name `pipeline(model=repo_id)` refuses to infer the task and the Hub shows no transformers snippet) plus the
`hfcap` tag, `pipeline_tag: image-text-to-text` (transformers 5 and the Hub no longer support "image-to-text"),
`datasets`, and a `model-index` holding only results hfcap measured, described by the protocol the metrics file
records (`protocol`: "coco", or "cider-d-only" for `hfcap evaluate --cider-only`).
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .models import get_architecture
from .provenance import Provenance

TEMPLATE = Path(__file__).resolve().parent / "model_card_template.md"
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
class Evaluation:
    """An `hfcap evaluate` result: `metrics` (keys of `METRICS`), and how they were obtained (`protocol`: a key of
    `EVALUATION_PROTOCOLS`)."""

    metrics: dict
    split: str | None = None
    num_images: int | None = None
    generate_kwargs: dict = dataclasses.field(default_factory=dict)
    protocol: str | None = None


def converted_provenance(model_type: str) -> Provenance:
    """The provenance of the architecture's released checkpoint once converted (its `CARD_FACTS["converted"]`)."""
    return Provenance(weights="converted", **get_architecture(model_type).card_facts()["converted"])


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


def _model_details(config, generation_defaults: dict, image_size) -> list[tuple[str, str]]:
    """(name, value) rows describing the architecture configuration and the generation defaults."""
    rows = [("Model class", f"`{get_architecture(config.model_type).model_class.__name__}`")]
    if getattr(config, "use_backbone", True) and getattr(config, "backbone", None):
        rows.append(("Visual backbone", f"timm `{config.backbone}`, inside the model (takes `pixel_values`)"))
    else:
        rows.append(("Visual backbone", "none: the model takes precomputed `visual_features`"))
    if image_size:
        rows.append(("Input images", f"{image_size}×{image_size} pixels (the processor's)"))
    rows.append(("Vocabulary", f"{config.vocab_size} tokens"))
    defaults = ", ".join(f"`{name}={value}`" for name, value in generation_defaults.items() if value is not None)
    rows.append(("Generation defaults (`generation_config.json`)", defaults))
    return rows


def model_card(
    config,
    generation_defaults: dict,
    *,
    repo_id: str,
    provenance: Provenance,
    evaluation: Evaluation | None = None,
    eval_dataset: str | None = None,
    eval_dataset_id: str | None = None,
    image_size: int | None = None,
) -> ModelCard:
    """Render the model card of an hfcap model from `TEMPLATE`.

    `evaluation` (hfcap's measured metrics) becomes the `model-index`, on `eval_dataset` / `eval_dataset_id`
    (default: the training dataset), and its `protocol` says how the card describes the evaluation (without
    `evaluation`: the COCO protocol hfcap uses). The original authors' results are rendered as their own tables,
    outside the model-index. `generation_defaults` are the model's `generation_config` values of its architecture's
    `GENERATION_DEFAULTS` keys; `image_size` is the processor's (None: not stated).
    """
    architecture = get_architecture(config.model_type)
    facts = architecture.card_facts()
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
        tags=["image-captioning", "hfcap", architecture.cli_name],
        datasets=[provenance.dataset_id] if provenance.dataset_id else None,
        metrics=sorted(set(METRICS[name] for name in evaluation.metrics)) if evaluation else None,
        model_name=repo_id,
        eval_results=eval_results,
    )
    if provenance.weights == "converted":
        weights_summary = f"converted from {provenance.source}."
        provenance_text = (
            f"Converted from {provenance.source} with `hfcap convert {architecture.cli_name}`. The converter reads the "
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
        title=f"{facts['name']} ({repo_id})",
        summary=facts["summary"],
        paper=facts["paper"],
        reference_implementation=facts["reference_implementation"],
        weights_summary=weights_summary,
        repo_id=repo_id,
        reference_beam_search_note=facts["reference_beam_search_note"],
        details=_model_details(config, generation_defaults, image_size),
        intended_use=INTENDED_USE,
        provenance_text=provenance_text,
        training_data=provenance.training_data,
        training_recipe=provenance.recipe,
        evaluation_protocol=EVALUATION_PROTOCOLS[evaluation.protocol if evaluation else "coco"],
        measured=[(name, f"{value:.4f}") for name, value in evaluation.metrics.items()] if evaluation else None,
        measured_caption=measured_caption,
        reported=facts["reported"],
        limitations=f"{GENERIC_LIMITATIONS}\n{facts['limitations']}",
        citation=facts["citation"],
    )


def reference_card(model_type: str) -> ModelCard:
    """The card of the architecture's converted original checkpoint, as `hfcap/<cli name>`: its default config with
    the settings the converter gives the released checkpoint (`CARD_FACTS["converted_config"]`), its generation
    defaults and the released model's image size (`CARD_FACTS["image_size"]`); `model_cards/<cli name>.md` is this
    card (regenerate: `reference_card(model_type).save(f"model_cards/{cli_name}.md")`)."""
    architecture = get_architecture(model_type)
    facts = architecture.card_facts()
    return model_card(
        architecture.config_class(**facts.get("converted_config", {})),
        architecture.generation_defaults,
        repo_id=f"hfcap/{architecture.cli_name}",
        provenance=converted_provenance(model_type),
        image_size=facts.get("image_size"),
    )


__all__ = ["METRICS", "Evaluation", "converted_provenance", "model_card", "read_metrics", "reference_card"]
