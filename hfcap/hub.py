"""Share hfcap models on the Hugging Face Hub: model, processor, generation config, remote code and model card.

CLI:    hfcap push DIR --repo-id ORG/NAME [--private] [--metrics metrics.json] [--weights converted|trained]
        [--source TEXT] [--dataset NAME] [--dataset-id HUB_ID] [--training-data TEXT] [--recipe TEXT]
        [--license ID] [--eval-dataset NAME] [--eval-dataset-id HUB_ID] [--commit-message TEXT]
Python: push_to_hub(model_dir, repo_id, ...) -> CommitInfo     everything in ONE commit (HfApi.upload_folder)

`model.push_to_hub(repo)` and `processor.push_to_hub(repo)` work as well: `import hfcap` registers the classes for
remote code, so every `save_pretrained` writes `auto_map` and copies the configuration/modeling/processing files.
`hfcap push` re-saves the model directory through those same `save_pretrained` calls (so the repo gets the current
remote code and only model files, not training leftovers), adds `hfcap_provenance.json` and the model card
(`hfcap.cards`), and uploads them in one commit. How the weights were obtained comes from `hfcap_provenance.json`
(`hfcap.provenance`), overridden by the CLI flags; `--weights converted` fills every other field with the
architecture's facts about the authors' released checkpoint.
"""

import argparse
import dataclasses
import tempfile
from pathlib import Path

from huggingface_hub import HfApi

from .cards import converted_provenance, model_card, read_metrics
from .loading import load_captioner
from .models import get_architecture
from .provenance import PROVENANCE_FIELDS, PROVENANCE_FILE, WEIGHTS, resolve_provenance, write_provenance

REPO_FILE_PATTERNS = ["*.safetensors", "*.bin", "*.json", "*.py", "*.md"]
"""Files of an earlier push that this push deletes unless it re-uploads them (e.g. stale weight shards)."""


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
    model, processor = load_captioner(model_dir)
    model_type = model.config.model_type
    resolved = resolve_provenance(model_dir, converted_provenance(model_type), **(provenance or {}))
    evaluation = read_metrics(metrics) if metrics is not None else None
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id  # "NAME" -> "USER/NAME"
    card = model_card(
        model.config,
        {name: getattr(model.generation_config, name) for name in get_architecture(model_type).generation_defaults},
        repo_id=repo_id,
        provenance=resolved,
        evaluation=evaluation,
        eval_dataset=eval_dataset,
        eval_dataset_id=eval_dataset_id,
        image_size=processor.image_processor.size["height"],
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
    """Run `hfcap push`; errors (a bad model directory, provenance or metrics file, a Hub error) reach `hfcap.cli`."""
    provenance = {field: getattr(args, field) for field in PROVENANCE_FIELDS}
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
    print(f"pushed {args.model_dir} -> {commit.commit_url}")
    return 0


__all__ = ["push_to_hub"]
