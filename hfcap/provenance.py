"""How the weights in a model directory were obtained: `hfcap_provenance.json`, which `hfcap convert` and the trainer
write and `hfcap push` turns into the model card's provenance section.

    write_provenance(model_dir, weights="converted" | "trained", ...) -> Path    the one writer
    resolve_provenance(model_dir, converted, **overrides) -> Provenance        file + CLI overrides, gaps filled
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

PROVENANCE_FILE = "hfcap_provenance.json"
WEIGHTS = ("converted", "trained")
"""Values of `Provenance.weights`."""


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


def resolve_provenance(model_dir, converted: Provenance, **overrides) -> Provenance:
    """`hfcap_provenance.json` of `model_dir` (if any) updated with the non-None `overrides` (fields of `Provenance`).

    `weights="converted"` takes every field not given from `converted`, the architecture's released checkpoint
    (`hfcap.cards.card_facts(model_type).converted`); `"trained"` needs at least `dataset`. Raises ValueError naming
    what is missing.
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
        return dataclasses.replace(converted, **values)
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


__all__ = ["PROVENANCE_FIELDS", "PROVENANCE_FILE", "Provenance", "WEIGHTS", "resolve_provenance", "write_provenance"]
