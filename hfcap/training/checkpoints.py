"""The trainer's checkpoint I/O: resumable training state and atomically replaced model directories.

    TrainerState                                     where training stands (saved as trainer_state.json)
    save_checkpoint(accelerator, output_dir, state, stage_name, keep)   checkpoints/<name>/ + checkpoints/latest
    latest_checkpoint(output_dir) -> Path | None     the checkpoint `latest` names (what --resume continues from)
    save_model_directory(model, processor, directory, **json_files)     best/<stage>/, model/: write, then rename

Checkpoints are written to ``checkpoints/.tmp-<name>`` and renamed when complete, and ``latest`` is replaced
atomically afterwards, so a crash while saving never leaves a broken ``latest``.
"""

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """Where training stands; saved as ``trainer_state.json`` in every checkpoint.

    ``step`` counts optimizer steps within the current stage, ``global_step`` across stages (the x axis of the
    logs); ``batches_done`` counts the micro-batches of the current epoch already consumed (the resume position).
    ``best_metric``/``bad_validations`` drive best-model selection, plateau decay and early stopping;
    ``plateau_scale`` is the learning-rate factor the plateau schedule has reached.
    """

    stage_index: int = 0
    stage_done: bool = False
    epoch: int = 0
    batches_done: int = 0
    step: int = 0
    global_step: int = 0
    best_metric: float = -math.inf
    bad_validations: int = 0
    last_validation_step: int = -1
    plateau_scale: float = 1.0

    def start_stage(self, index: int):
        """Reset the per-stage counters for stage ``index``."""
        self.stage_index, self.stage_done, self.epoch, self.batches_done, self.step = index, False, 0, 0, 0
        self.best_metric, self.bad_validations, self.last_validation_step, self.plateau_scale = -math.inf, 0, -1, 1.0

    @classmethod
    def load(cls, checkpoint: Path) -> "TrainerState":
        with open(checkpoint / STATE_FILE, encoding="utf-8") as handle:
            return cls(**json.load(handle)["state"])


def write_atomically(path: Path, text: str):
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (readers see old or new, never half)."""
    temporary = path.with_name(f".tmp-{path.name}")
    with temporary.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def latest_checkpoint(output_dir) -> Path | None:
    """The checkpoint ``checkpoints/latest`` names, or None when there is none; an error if it is incomplete."""
    root = Path(output_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    checkpoint = root / pointer.read_text(encoding="utf-8").strip()
    if not (checkpoint / STATE_FILE).is_file():
        raise FileNotFoundError(f"{pointer} names {checkpoint}, which is missing or incomplete (no {STATE_FILE})")
    return checkpoint


def save_checkpoint(accelerator, output_dir, state: TrainerState, stage_name: str, keep: int) -> None:
    """``accelerator.save_state`` into a temporary folder, then rename it and repoint ``latest`` (atomic); only the
    newest ``keep`` checkpoints stay. Every process calls it."""
    name = f"{state.global_step:08d}-{stage_name}-e{state.epoch}-b{state.batches_done}"
    name += "-done" if state.stage_done else ""
    root = Path(output_dir) / CHECKPOINTS
    final, temporary = root / name, root / f".tmp-{name}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_atomically(temporary / STATE_FILE, json.dumps({"state": asdict(state)}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        write_atomically(root / LATEST, name)
        complete = sorted(path for path in root.iterdir() if (path / STATE_FILE).is_file() and path.name != name)
        for old in complete[: max(0, len(complete) + 1 - keep)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def save_model_directory(model, processor, directory, **json_files) -> None:
    """``save_pretrained`` of ``model`` and ``processor`` (plus ``NAME.json`` files from ``json_files``) into
    ``directory``, replacing an existing one only once the new one is complete (main process only)."""
    final = Path(directory)
    temporary, old = final.with_name(f".tmp-{final.name}"), final.with_name(f".old-{final.name}")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    processor.save_pretrained(temporary)
    for name, content in json_files.items():
        (temporary / f"{name}.json").write_text(json.dumps(content, indent=2) + "\n")
    if final.exists():
        os.replace(final, old)
    os.replace(temporary, final)
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["CHECKPOINTS", "LATEST", "STATE_FILE", "TrainerState", "latest_checkpoint", "save_checkpoint",
           "save_model_directory", "write_atomically"]
