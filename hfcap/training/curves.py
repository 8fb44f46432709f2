"""Training curves: loss, SCST reward and validation CIDEr-D against the step, from the trainer's `log.jsonl`."""

import json
from pathlib import Path

TRAINING_CURVES = {"loss": "loss", "reward": "SCST reward", "val_CIDEr-D": "validation CIDEr-D"}


def _read_records(log) -> list[dict]:
    """Records from a JSON-lines file path or an iterable of dicts."""
    if isinstance(log, (str, Path)):
        with open(log, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    return list(log)


def plot_training_curves(log, output_png) -> Path:
    """Plot loss, SCST reward and validation CIDEr-D against ``step`` into a PNG.

    Args:
        log: path of a JSON-lines training log, or a list of records such as
            ``{"step": 10, "stage": "xe", "loss": 3.2}`` / ``{"step": 900, "stage": "scst", "reward": 0.4,
            "val_CIDEr-D": 61.0}``. Each of ``loss``, ``reward`` and ``val_CIDEr-D`` gets a subplot when some record
            has it; each training stage is a separate line.
        output_png: where to write the figure: 500×400 pixels per subplot, side by side.

    Returns:
        The path of the PNG.
    """
    from matplotlib.figure import Figure

    records = [record for record in _read_records(log) if "step" in record]
    keys = [key for key in TRAINING_CURVES if any(record.get(key) is not None for record in records)]
    if not keys:
        raise ValueError(f"no records with 'step' and any of {list(TRAINING_CURVES)} to plot")
    figure = Figure(figsize=(5 * len(keys), 4), dpi=100, layout="constrained")
    for axes, key in zip(figure.subplots(1, len(keys), squeeze=False)[0], keys):
        stages = dict.fromkeys(record.get("stage", "train") for record in records if record.get(key) is not None)
        for stage in stages:
            points = [
                (record["step"], record[key])
                for record in records
                if record.get(key) is not None and record.get("stage", "train") == stage
            ]
            steps, values = zip(*points)
            axes.plot(steps, values, marker="." if len(points) < 50 else None, label=stage)
        axes.set(title=TRAINING_CURVES[key], xlabel="step")
        axes.grid(alpha=0.3)
        axes.legend()
    output_png = Path(output_png)
    output_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output_png, format="png")
    return output_png
