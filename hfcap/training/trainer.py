"""The hfcap trainer: cross-entropy (XE) then self-critical (SCST) stages on 🤗 Accelerate, then the test evaluation.

One loop for every setting (1 CPU process, N CPU processes, N GPUs with DDP; fp32/bf16/fp16), written out nanoGPT-style:

    for stage in config.stages:                   # e.g. [xe, scst]
        prepare(model, optimizer, train loader)   # a fresh optimizer/schedule per stage
        for epoch, batch:                          # resumable mid-epoch (skip_first_batches)
            loss = XE loss | SCST loss             # hfcap.training.scst for the latter
            backward, clip, step, schedule
            every N steps: log, validate (CIDEr-D), checkpoint
        end of epoch: validate → best model by CIDEr-D, plateau lr decay, early stopping; checkpoint
    best model → output_dir/model; test metrics (trivial baseline + best model of every stage), table, curves, maps

Output directory::

    config.yaml            the resolved configuration
    log.jsonl              one JSON record per logged step/validation (also sent to TensorBoard under logs/)
    checkpoints/<name>/    accelerate save_state + trainer_state.json; checkpoints/latest names the newest
    best/<stage>/          save_pretrained of the best model of each stage (by validation CIDEr-D) + validation.json
    model/                 the final model (best of the last stage): model, processor, generation config
    test/<stage>/          metrics.json, metrics.md, captions_test_results.json of each stage's best model
    metrics.json           the final model's test summary (as `hfcap evaluate` writes it) + "table": all rows
    metrics.md             the test table: trivial baseline, then the best model of each stage
    training_curves.png, attention/*.png

Checkpoints are written to ``checkpoints/.tmp-<name>`` and renamed when complete, and ``latest`` is replaced
atomically afterwards, so a crash while saving never leaves a broken ``latest``. ``resume=True`` restores the
model, optimizer, schedule, RNG states, stage, epoch, step and data position of the checkpoint ``latest`` names.
"""

import json
import math
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.tracking import GeneralTracker, on_main_process
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, set_seed

from .config import StageConfig, TrainingConfig

logger = get_logger(__name__, log_level="INFO")

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"


class JsonlTracker(GeneralTracker):
    """Accelerate tracker writing one JSON object per ``accelerator.log`` call to ``<output_dir>/log.jsonl``."""

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, output_dir):
        super().__init__()
        self.path = Path(output_dir) / "log.jsonl"

    @property
    def tracker(self):
        return self.path

    @on_main_process
    def store_init_configuration(self, values: dict):
        self.log({"event": "config", **values})

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs):
        record = {"step": step, "time": round(time.time(), 2), **values}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


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


class LRSchedule:
    """The learning-rate multiplier of a stage as a function of the optimizer step (for ``LambdaLR``).

    See ``StageConfig`` for the formulas; ``plateau_scale`` is lowered by the trainer on validation plateaus.
    """

    def __init__(self, stage: StageConfig, steps_per_epoch: int, total_steps: int, plateau_scale: float = 1.0):
        self.kind, self.warmup = stage.schedule, stage.warmup_steps
        self.model_dim, self.total_steps, self.steps_per_epoch = stage.noam_model_dim, total_steps, steps_per_epoch
        self.anneal_every_epochs, self.anneal_factor = stage.anneal_every_epochs, stage.anneal_factor
        self.min_lr_ratio = stage.min_lr / stage.lr
        self.plateau_scale = plateau_scale

    def __call__(self, step: int) -> float:
        if self.kind == "noam":  # Vaswani et al. 2017, Eq. (3)
            s = step + 1
            return self.model_dim ** -0.5 * min(s ** -0.5, s * self.warmup ** -1.5)
        if self.kind == "warmup_anneal":  # ExpansionNet v2 custom_warmup_anneal (hyperbolic warmup, step decay)
            decay = self.anneal_factor ** (step // (self.steps_per_epoch * self.anneal_every_epochs))
            return max(self.min_lr_ratio if step >= self.warmup else 0.0, decay / max(self.warmup - step, 1))
        warmup = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        if self.kind == "linear":
            decay_steps = max(self.total_steps - self.warmup, 1)
            return warmup * max(0.0, 1.0 - max(step - self.warmup, 0) / decay_steps)
        return warmup * self.plateau_scale  # constant, plateau


# ----------------------------------------------------------------------------------------------------------- data


def load_splits(config: TrainingConfig):
    """The ``DatasetDict`` (train, val[, test]) named by ``config.data``, cut to the ``max_*_images`` limits."""
    from datasets import DatasetDict

    from hfcap import data as hdata

    data = config.data
    if data.name == "scenes":
        splits = hdata.load_scenes(data.cache_dir, num_train=data.num_train, num_val=data.num_val,
                                   num_test=data.num_test, seed=data.seed, image_size=data.scenes_image_size)
    elif data.name == "karpathy":
        splits = hdata.load_karpathy(data.json_path, data.images_root, skip_bad_records=data.skip_bad_records)
    elif data.name == "coco":
        splits = DatasetDict({split: hdata.load_coco_captions(path, data.images_dir[split],
                                                              skip_bad_records=data.skip_bad_records)
                              for split, path in data.annotations.items()})
    else:
        splits = hdata.load_caption_folder(data.root, skip_bad_records=data.skip_bad_records)
    for split in ("train", "val"):
        if split not in splits or len(splits[split]) == 0:
            raise ValueError(f"the {data.name} dataset has no (or an empty) {split!r} split; "
                             f"splits: {dict(splits.num_rows)}")
    limits = {"train": data.max_train_images, "val": data.max_val_images, "test": data.max_test_images}
    return DatasetDict({name: split.select(range(min(limits[name], len(split))))
                        if limits.get(name) is not None else split
                        for name, split in splits.items() if name in limits})


def build_processor(config: TrainingConfig, train_split):
    """The processor of ``model.init_from`` if it has one, else a new one with a vocabulary from the train captions."""
    from hfcap.processing import CaptioningProcessor, build_word_level_tokenizer, make_image_processor

    if config.model.init_from and (Path(config.model.init_from) / "processor_config.json").is_file():
        return CaptioningProcessor.from_pretrained(config.model.init_from)
    captions = [caption for captions in train_split["captions"] for caption in captions]
    tokenizer = build_word_level_tokenizer(captions, min_frequency=config.processor.min_word_frequency)
    image_processor = make_image_processor(config.processor.image_size, resample=config.processor.resample)
    return CaptioningProcessor(image_processor, tokenizer, max_caption_length=config.processor.max_caption_length)


def caption_pairs(split):
    """One row per (image, caption) pair, via a batched ``map`` that never decodes the images (hf_stack §7)."""
    from datasets import Image

    def expand(batch):
        counts = [len(captions) for captions in batch["captions"]]
        return {"image": [image for image, n in zip(batch["image"], counts) for _ in range(n)],
                "image_id": [image_id for image_id, n in zip(batch["image_id"], counts) for _ in range(n)],
                "caption": [caption for captions in batch["captions"] for caption in captions]}

    pairs = split.cast_column("image", Image(decode=False)).map(
        expand, batched=True, remove_columns=split.column_names, desc="Expanding (image, caption) pairs")
    return pairs.cast_column("image", Image())


class OneCaptionPerImage(torch.utils.data.Dataset):
    """Each row (image) once per epoch with one of its ``captions`` as ``caption``, drawn from (seed, epoch, index):
    the same on every process and after a resume; the trainer calls ``set_epoch``."""

    def __init__(self, rows, seed: int):
        self.rows, self.seed, self.epoch = rows, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        row = dict(self.rows[index])
        captions = row.pop("captions")
        return {**row, "caption": random.Random(f"{self.seed}-{self.epoch}-{index}").choice(captions)}


class Indexed(torch.utils.data.Dataset):
    """Rows plus ``index``, their position (= the training-image index of the SCST reward's references)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return {**self.rows[index], "index": index}


def make_collate(processor, kind: str):
    """``collate_fn`` of the training loaders.

    ``pairs``: rows (image|visual_features, caption) → pixel_values|visual_features, labels.
    ``grouped``: rows (image|visual_features, captions) → one image per row plus ``caption_counts`` (B,) and the
    labels of all captions (Σ counts rows): the image is encoded once and its features repeated per caption.
    ``images``: rows (image|visual_features, index) → pixel_values|visual_features, image_index (SCST).
    """

    def visual(rows):
        if "visual_features" in rows[0]:
            return {"visual_features": torch.stack([row["visual_features"] for row in rows])}
        return {"pixel_values": processor(images=[row["image"] for row in rows], return_tensors="pt")["pixel_values"]}

    def collate(rows):
        batch = visual(rows)
        if kind == "pairs":
            batch["labels"] = processor(text_target=[row["caption"] for row in rows], return_tensors="pt")["labels"]
        elif kind == "grouped":
            captions = [caption for row in rows for caption in row["captions"]]
            batch["labels"] = processor(text_target=captions, return_tensors="pt")["labels"]
            batch["caption_counts"] = torch.tensor([len(row["captions"]) for row in rows])
        else:
            batch["image_index"] = torch.tensor([row["index"] for row in rows])
        return batch

    return collate


def most_frequent_caption(split) -> str:
    """The most frequent training caption (after lowercasing and whitespace normalisation): the trivial baseline."""
    counts = Counter(" ".join(caption.lower().split()) for captions in split["captions"] for caption in captions)
    return counts.most_common(1)[0][0]


# ---------------------------------------------------------------------------------------------------------- model


def check_model_type(config: TrainingConfig):
    """Raise ``ValueError`` early when ``model.type`` names an architecture this hfcap version does not have."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    import hfcap  # noqa: F401  (registers the hfcap architectures with the Auto classes)

    if not config.model.init_from and config.model.type not in CONFIG_MAPPING:
        available = sorted(config_class.model_type for config_class in hfcap.MODELS)
        raise ValueError(f"model type {config.model.type!r} is not available in this hfcap version (available: "
                         f"{', '.join(available)})")


def build_model(config: TrainingConfig, processor):
    """A new model from ``model.type``/``model.config`` (special ids and vocabulary from ``processor``), or the
    ``save_pretrained`` model of ``model.init_from``."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    check_model_type(config)
    if config.model.init_from:
        if not (Path(config.model.init_from) / "config.json").is_file():
            raise FileNotFoundError(f"model.init_from={config.model.init_from} is not a save_pretrained directory "
                                    "(no config.json)")
        model = AutoModelForImageTextToText.from_pretrained(config.model.init_from)
        if model.config.vocab_size < len(processor.tokenizer):
            raise ValueError(f"the tokenizer has {len(processor.tokenizer)} tokens but the model of "
                             f"{config.model.init_from} only {model.config.vocab_size}")
        return model
    tokenizer = processor.tokenizer
    kwargs = dict(config.model.config, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  decoder_start_token_id=tokenizer.bos_token_id)
    try:
        model_config = AutoConfig.for_model(config.model.type, **kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"model.config is not valid for {config.model.type}: {error}") from None
    if hasattr(model_config, "image_size"):
        model_config.image_size = config.processor.image_size
    return AutoModelForImageTextToText.from_config(model_config)


def build_optimizer(model, stage: StageConfig):
    """Adam / AdamW / RAdam over the trainable parameters; the backbone gets ``backbone_lr`` when set."""
    backbone, rest = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (backbone if ".backbone." in f".{name}" and stage.backbone_lr is not None else rest).append(parameter)
    groups = [{"params": rest}] + ([{"params": backbone, "lr": stage.backbone_lr}] if backbone else [])
    optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}
    return optimizers[stage.optimizer](groups, lr=stage.lr, betas=tuple(stage.betas), eps=stage.eps,
                           weight_decay=stage.weight_decay)


# ---------------------------------------------------------------------------------------------------- checkpoints


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


def _write_atomically(path: Path, text: str):
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (readers see old or new, never half)."""
    temporary = path.with_name(f".tmp-{path.name}")
    with temporary.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


# -------------------------------------------------------------------------------------------------------- trainer


class Trainer:
    """Runs ``config`` end to end: ``Trainer(config).train()`` → the test metrics (row name → metrics dict).

    Every process of an ``accelerate launch`` builds its own Trainer; the main process writes the files.
    """

    def __init__(self, config: TrainingConfig, *, resume: bool = False):
        self.config = config
        self.resume = resume
        self.output_dir = Path(config.output_dir)
        # On cached features the backbone gets no gradients: DDP must be told that parameters may go unused.
        unused = DistributedDataParallelKwargs(find_unused_parameters=any(s.cached_features for s in config.stages))
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            project_dir=str(self.output_dir),
            log_with=[JsonlTracker(self.output_dir), *config.report_to],
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
            kwargs_handlers=[unused],
        )
        acc = self.accelerator
        if acc.device.type == "cpu":
            threads = config.num_threads or max(1, len(os.sched_getaffinity(0)) // acc.num_processes)
            torch.set_num_threads(threads)
            if config.mixed_precision == "fp16":
                logger.warning("mixed_precision=fp16 runs in fp32 on CPU (accelerate has no CPU fp16 autocast); "
                               "use bf16", main_process_only=True)
        print(f"[hfcap train] process {acc.process_index} of {acc.num_processes} "
              f"({acc.distributed_type.value}, device {acc.device}, {torch.get_num_threads()} threads)", flush=True)
        set_seed(config.seed)
        self.state = TrainerState()
        self.timings = {}

    # ------------------------------------------------------------------------------------------------- entry point

    def train(self) -> dict:
        """Train every stage, then evaluate on the test split; returns the test metrics table as a dict."""
        acc, config = self.accelerator, self.config
        start = time.perf_counter()
        check_model_type(config)
        checkpoint = self._prepare_output_dir()
        with acc.main_process_first():
            self.splits = load_splits(config)
        self.processor = build_processor(config, self.splits["train"])
        self.model = build_model(config, self.processor)
        self.model.generation_config.num_beams = config.test.num_beams
        self.model.generation_config.max_new_tokens = config.test.max_new_tokens
        self.model.to(acc.device)
        acc.init_trackers("logs", config=self._flat_config())
        if acc.is_main_process:
            logger.info(f"{sum(p.numel() for p in self.model.parameters()):,} parameters; train/val/test images: "
                        f"{ {name: len(split) for name, split in self.splits.items()} }; "
                        f"vocabulary {len(self.processor.tokenizer)}; {acc.num_processes} process(es)")
        acc.log({"event": "start", "num_processes": acc.num_processes}, step=0)

        if checkpoint is not None:
            with open(checkpoint / STATE_FILE, encoding="utf-8") as handle:
                saved = json.load(handle)
            self.state = TrainerState(**saved["state"])
            if acc.is_main_process:
                self._truncate_log(self.state.global_step)
            logger.info(f"Resuming from {checkpoint}: stage {config.stages[self.state.stage_index].name}, "
                        f"epoch {self.state.epoch}, step {self.state.step} (global {self.state.global_step})",
                        main_process_only=True)
        for index in range(self.state.stage_index, len(config.stages)):
            self._run_stage(index, checkpoint if index == self.state.stage_index else None)
            checkpoint = None
        self.timings["train_seconds"] = round(time.perf_counter() - start, 1)
        results = self._final_evaluation()
        acc.end_training()
        return results

    def _prepare_output_dir(self) -> Path | None:
        """Create the output directory; return the checkpoint to resume from (or None for a fresh run)."""
        acc = self.accelerator
        checkpoint = None
        if self.resume:
            checkpoint = latest_checkpoint(self.output_dir)
            if checkpoint is None:
                logger.warning(f"--resume: no checkpoint in {self.output_dir / CHECKPOINTS}; starting from scratch",
                               main_process_only=True)
        if acc.is_main_process:
            if checkpoint is None:
                for stale in (CHECKPOINTS, "best", "features", "logs", "model", "test", "val", "attention", "log.jsonl",
                              "metrics.json", "metrics.md", "training_curves.png"):
                    path = self.output_dir / stale
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            import yaml

            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        acc.wait_for_everyone()
        return checkpoint

    def _truncate_log(self, global_step: int):
        """Drop the log records of steps after the checkpoint (they are trained again after a resume)."""
        path = self.output_dir / "log.jsonl"
        if path.is_file():
            records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            kept = [r for r in records if r.get("step") is None or r["step"] <= global_step]
            _write_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))

    def _flat_config(self) -> dict:
        """Scalar hyperparameters for the trackers (TensorBoard's hparams take scalars only)."""
        flat = {}

        def walk(prefix, value):
            if isinstance(value, dict):
                for key, item in value.items():
                    walk(f"{prefix}{key}.", item)
            elif isinstance(value, list) and value and isinstance(value[0], dict):
                for item in value:
                    walk(f"{prefix}{item.get('name', '')}.", item)
            else:
                flat[prefix.rstrip(".")] = value if isinstance(value, (int, float, str, bool)) else str(value)

        walk("", self.config.to_dict())
        return flat

    # ----------------------------------------------------------------------------------------------------- stages

    def _run_stage(self, index: int, checkpoint: Path | None):
        """Run stage ``index``, from its start or from ``checkpoint`` (which belongs to this stage)."""
        acc, stage, state = self.accelerator, self.config.stages[index], self.state
        if checkpoint is None:
            state.start_stage(index)
            if stage.init_from_best and index > 0:
                self._load_best(self.config.stages[index - 1].name)
        acc.free_memory()
        acc.gradient_accumulation_steps = stage.gradient_accumulation_steps
        if stage.type == "xe" and hasattr(self.model.config, "label_smoothing"):
            self.model.config.label_smoothing = stage.label_smoothing
        elif stage.type == "xe" and stage.label_smoothing:
            raise ValueError(f"stage {stage.name}: {self.model.config.model_type} has no label_smoothing setting")
        if stage.trainable_backbone_layers is not None:
            if not hasattr(self.model.config, "trainable_backbone_layers"):
                raise ValueError(f"stage {stage.name}: {self.model.config.model_type} has no "
                                 "trainable_backbone_layers setting")
            self.model.config.trainable_backbone_layers = stage.trainable_backbone_layers
        self.model.train()  # SAT applies trainable_backbone_layers (requires_grad) in train()
        loader = self._train_loader(stage)
        optimizer = build_optimizer(self.model, stage)
        model, optimizer, loader = acc.prepare(self.model, optimizer, loader)
        steps_per_epoch = math.ceil(len(loader) / stage.gradient_accumulation_steps)
        total_steps = stage.epochs * steps_per_epoch
        if stage.max_steps is not None:
            total_steps = min(total_steps, stage.max_steps)
        schedule = LRSchedule(stage, steps_per_epoch, total_steps, state.plateau_scale)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, schedule)
        if checkpoint is not None:
            acc.load_state(str(checkpoint))  # model, optimizer (with its current lr), RNG states
            scheduler.last_epoch = state.step
        reward = None
        if stage.type == "scst" and not state.stage_done and state.step < total_steps:
            reward = self._scst_reward(stage)

        logger.info(f"Stage {stage.name} ({stage.type}): {total_steps} optimizer steps, {steps_per_epoch} per "
                    f"epoch, batch {stage.batch_size} x {acc.num_processes} process(es) x "
                    f"{stage.gradient_accumulation_steps} accumulation", main_process_only=True)
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=state.step, desc=stage.name, unit="step",
                        disable=not acc.is_local_main_process, dynamic_ncols=True)
        model.train()
        running = {"loss": 0.0, "batches": 0}
        while not state.stage_done and state.epoch < stage.epochs and state.step < total_steps:
            loader.set_epoch(state.epoch)
            if hasattr(loader.dataset, "set_epoch"):  # accelerate skips the dataset when it shards batches
                loader.dataset.set_epoch(state.epoch)
            batches = acc.skip_first_batches(loader, state.batches_done) if state.batches_done else loader
            for batch in batches:
                with acc.accumulate(model):
                    loss, stats = self._loss(model, batch, stage, reward)
                    self._check_finite(loss, stage, optimizer)
                    acc.backward(loss)
                    if acc.sync_gradients:
                        if stage.clip_grad_norm is not None:
                            acc.clip_grad_norm_(model.parameters(), stage.clip_grad_norm)
                        elif stage.clip_grad_value is not None:
                            acc.clip_grad_value_(model.parameters(), stage.clip_grad_value)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                state.batches_done += 1
                running["loss"] += loss.item()
                running["batches"] += 1
                for key, value in stats.items():
                    running[key] = running.get(key, 0.0) + value
                if not acc.sync_gradients:
                    continue
                scheduler.step()
                state.step += 1
                state.global_step += 1
                progress.update(1)
                if state.step % self.config.log_every_steps == 0 or state.step == total_steps:
                    self._log_training(stage, running, scheduler, progress)
                    running = {"loss": 0.0, "batches": 0}
                if self.config.validate_every_steps and state.step % self.config.validate_every_steps == 0:
                    self._validate(model, stage, scheduler)
                if state.stage_done or state.step >= total_steps:
                    break
                if self.config.save_every_steps and state.step % self.config.save_every_steps == 0:
                    self._save_checkpoint()
            else:  # the epoch ran to its end
                state.epoch += 1
                state.batches_done = 0
                if state.last_validation_step != state.step:
                    self._validate(model, stage, scheduler)
                if not (state.stage_done or state.epoch >= stage.epochs or state.step >= total_steps):
                    self._save_checkpoint()
        progress.close()
        if not state.stage_done:
            if state.last_validation_step != state.step and total_steps > 0:
                self._validate(model, stage, scheduler)
            state.stage_done = True
            self._save_checkpoint()

    def _train_loader(self, stage: StageConfig):
        """The training DataLoader of a stage (shuffled; accelerate shards it and seeds the order per epoch)."""
        train, mode = self.splits["train"], self.config.data.xe_captions
        if stage.type == "scst":
            rows, kind = train.select_columns(["image", "image_id"]), "images"
        elif mode == "pairs":
            rows, kind = caption_pairs(train), "pairs"
        else:
            rows, kind = train, "grouped" if mode == "grouped" else "pairs"
        if stage.cached_features:
            rows = self._cached_features(rows)
        if stage.type == "scst":
            rows = Indexed(rows)
        elif mode == "one_per_image":
            rows = OneCaptionPerImage(rows, self.config.seed)
        return torch.utils.data.DataLoader(rows, batch_size=stage.batch_size, shuffle=True,
                                           collate_fn=make_collate(self.processor, kind),
                                           num_workers=self.config.data.num_workers)

    def _cached_features(self, rows):
        """``rows`` (with ``image_id``) joined with backbone features cached once under ``output_dir/features``."""
        from .feature_cache import INDEX_NAME, CachedFeatureDataset, cache_visual_features

        features_dir = self.output_dir / "features" / self.config.stages[self.state.stage_index].name
        if self.accelerator.is_main_process and not (features_dir / INDEX_NAME).is_file():
            cache_visual_features(self.model, self.processor, self.splits["train"], features_dir)
        self.accelerator.wait_for_everyone()
        return CachedFeatureDataset(features_dir, rows)

    def _scst_reward(self, stage: StageConfig):
        """The CIDEr-D reward with document frequencies from the training references (built once per stage)."""
        from .scst import ScstReward

        return ScstReward(self.splits["train"]["captions"], include_eos=stage.include_eos, df_mode=stage.df_mode)

    # ------------------------------------------------------------------------------------------------------ steps

    def _loss(self, model, batch, stage: StageConfig, reward):
        """(loss, stats) of one micro-batch: teacher-forced cross-entropy, or the SCST policy-gradient loss."""
        inputs = {key: batch[key] for key in ("pixel_values", "visual_features") if key in batch}
        if stage.type == "scst":
            from .scst import scst_step

            loss, stats = scst_step(model, inputs, batch["image_index"].tolist(), reward, processor=self.processor,
                                    accelerator=self.accelerator, num_samples=stage.num_samples,
                                    baseline=stage.baseline, max_new_tokens=stage.max_new_tokens,
                                    normalisation=stage.normalisation)
            keep = ("reward_mean", "baseline_mean", "sample_length_mean", "greedy_reward_mean")
            return loss, {key: value for key, value in stats.items() if key in keep}
        if "caption_counts" not in batch:
            return model(**inputs, labels=batch["labels"], use_cache=False).loss, {}
        with self.accelerator.autocast():
            encoded = self.accelerator.unwrap_model(model).get_encoder()(**inputs, return_dict=True)
        counts = batch["caption_counts"]
        repeated = type(encoded)(**{name: value.repeat_interleave(counts, dim=0)
                                    for name, value in encoded.items() if torch.is_tensor(value)})
        return model(encoder_outputs=repeated, labels=batch["labels"], use_cache=False).loss, {}

    def _check_finite(self, loss, stage: StageConfig, optimizer):
        """Stop with a clear error when any process's loss is NaN/inf (checked on all processes together)."""
        bad = self.accelerator.reduce(torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0],
                                                   device=loss.device), reduction="sum")
        if bad.item() > 0:
            state = self.state
            lr = optimizer.param_groups[0]["lr"]
            raise FloatingPointError(
                f"training diverged: the {stage.type} loss is {loss.item()} (non-finite) in stage {stage.name!r} at "
                f"optimizer step {state.step + 1} (global step {state.global_step + 1}, epoch {state.epoch}, batch "
                f"{state.batches_done}); learning rate {lr:g}. Lower the learning rate or clip gradients "
                "(clip_grad_norm / clip_grad_value).")

    def _log_training(self, stage: StageConfig, running: dict, scheduler, progress):
        """Average the running sums over micro-batches and processes, then log them (JSONL + trackers)."""
        acc = self.accelerator
        keys = sorted(key for key in running if key != "batches")
        totals = torch.tensor([running[key] for key in keys] + [running["batches"]], device=acc.device,
                              dtype=torch.float64)
        totals = acc.reduce(totals, reduction="sum")
        values = {key.removesuffix("_mean"): (totals[i] / totals[-1]).item() for i, key in enumerate(keys)}
        values.update(stage=stage.name, lr=scheduler.optimizer.param_groups[0]["lr"], epoch=self.state.epoch)
        acc.log(values, step=self.state.global_step)
        progress.set_postfix({key: f"{values[key]:.3g}" for key in ("loss", "reward") if key in values})

    # ------------------------------------------------------------------------------------------------- validation

    def _validate(self, model, stage: StageConfig, scheduler):
        """Validation CIDEr-D; keeps the best model of the stage, decays the lr on plateaus, stops early."""
        from .evaluation import evaluate_captioner

        acc, state, settings = self.accelerator, self.state, self.config.validation
        val = self.splits["val"]
        if settings.max_images is not None:
            val = val.select(range(min(settings.max_images, len(val))))
        metrics = evaluate_captioner(model, self.processor, val, accelerator=acc, batch_size=settings.batch_size,
                                     generate_kwargs=self._generate_kwargs(settings), full_metrics=False)
        score = metrics["CIDEr-D"]
        state.last_validation_step = state.step
        improved = score > state.best_metric
        if improved:
            state.best_metric, state.bad_validations = score, 0
            self._save_best(stage, score)
        else:
            state.bad_validations += 1
            if stage.schedule == "plateau" and state.bad_validations % stage.plateau_patience == 0:
                state.plateau_scale *= stage.plateau_factor
                scheduler.lr_lambdas[0].plateau_scale = state.plateau_scale
                for group, base_lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
                    group["lr"] = base_lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
            if stage.patience is not None and state.bad_validations >= stage.patience:
                logger.info(f"Early stopping of stage {stage.name}: no better validation CIDEr-D for "
                            f"{state.bad_validations} validations", main_process_only=True)
                state.stage_done = True
        acc.log({"stage": stage.name, "val_CIDEr-D": score, "best_val_CIDEr-D": state.best_metric},
                step=state.global_step)
        logger.info(f"[{stage.name}] step {state.step}: validation CIDEr-D {score:.2f} "
                    f"(best {state.best_metric:.2f})", main_process_only=True)

    def _generate_kwargs(self, settings) -> dict:
        return {"num_beams": settings.num_beams, "max_new_tokens": settings.max_new_tokens, "do_sample": False}

    def _save_best(self, stage: StageConfig, score: float):
        """``best/<stage>/``: save_pretrained of model + processor, replaced atomically (write, then rename)."""
        acc = self.accelerator
        if acc.is_main_process:
            final = self.output_dir / "best" / stage.name
            temporary = final.with_name(f".tmp-{stage.name}")
            shutil.rmtree(temporary, ignore_errors=True)
            self.model.save_pretrained(temporary)
            self.processor.save_pretrained(temporary)
            (temporary / "validation.json").write_text(json.dumps(
                {"CIDEr-D": score, "step": self.state.step, "global_step": self.state.global_step}))
            old = final.with_name(f".old-{stage.name}")
            if final.exists():
                os.replace(final, old)
            os.replace(temporary, final)
            shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def _load_best(self, stage_name: str):
        """Replace the model by the best one of stage ``stage_name`` (if that stage kept one)."""
        path = self.output_dir / "best" / stage_name
        if not (path / "config.json").is_file():
            logger.warning(f"no best model of stage {stage_name} to load; keeping the current weights",
                           main_process_only=True)
            return
        self.model = type(self.model).from_pretrained(path).to(self.accelerator.device)

    # ------------------------------------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self):
        """``accelerator.save_state`` into a temporary folder, then rename it and repoint ``latest`` (atomic)."""
        acc, state = self.accelerator, self.state
        stage = self.config.stages[state.stage_index].name
        name = f"{state.global_step:08d}-{stage}-e{state.epoch}-b{state.batches_done}"
        name += "-done" if state.stage_done else ""
        root = self.output_dir / CHECKPOINTS
        final, temporary = root / name, root / f".tmp-{name}"
        if acc.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(temporary))
        acc.wait_for_everyone()
        if acc.is_main_process:
            _write_atomically(temporary / STATE_FILE, json.dumps({"state": asdict(state)}, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(temporary, final)
            _write_atomically(root / LATEST, name)
            complete = sorted(path for path in root.iterdir() if (path / STATE_FILE).is_file() and path.name != name)
            for old in complete[: max(0, len(complete) + 1 - self.config.max_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    # ------------------------------------------------------------------------------------------- final evaluation

    def _final_evaluation(self) -> dict:
        """Save the final model; test the trivial baseline and each stage's best model; write table, curves, maps."""
        from hfcap.hub import write_provenance
        from hfcap.metrics import format_metrics_table

        from .evaluation import evaluate_captioner, score_captions

        acc, config = self.accelerator, self.config
        acc.free_memory()
        start = time.perf_counter()
        split = "test" if "test" in self.splits and len(self.splits["test"]) else "val"
        dataset = self.splits[split]
        if config.test.max_images is not None:
            dataset = dataset.select(range(min(config.test.max_images, len(dataset))))
        references = dict(zip((int(i) for i in dataset["image_id"]), dataset["captions"]))
        rows = {}
        if acc.is_main_process:
            caption = most_frequent_caption(self.splits["train"])
            rows["baseline (most frequent caption)"] = score_captions(
                {image_id: caption for image_id in references}, references, full_metrics=config.test.full_metrics)
        for stage in config.stages:
            if not (self.output_dir / "best" / stage.name).is_dir():
                continue
            self._load_best(stage.name)
            rows[stage.name] = evaluate_captioner(
                self.model, self.processor, dataset, accelerator=acc, batch_size=config.test.batch_size,
                generate_kwargs=self._generate_kwargs(config.test), output_dir=self.output_dir / split / stage.name,
                split=split, full_metrics=config.test.full_metrics)
        self.timings["test_seconds"] = round(time.perf_counter() - start, 1)
        if acc.is_main_process:
            final_dir = self.output_dir / "model"
            shutil.rmtree(final_dir, ignore_errors=True)
            self.model.save_pretrained(final_dir)
            self.processor.save_pretrained(final_dir)
            recipe = ", then ".join(f"{stage.name} ({stage.type}, lr {stage.lr:g})" for stage in config.stages)
            write_provenance(final_dir, weights="trained", dataset=config.data.name, recipe=f"hfcap train: {recipe}")
            table = format_metrics_table(rows)
            print(f"\nTest metrics ({split} split, {len(dataset)} images, beam {config.test.num_beams}):\n{table}\n",
                  flush=True)
            (self.output_dir / "metrics.md").write_text(table + "\n")
            # The final model's `hfcap evaluate` summary (what `hfcap push --metrics` reads) plus the whole table.
            evaluated = [name for name in rows if (self.output_dir / split / name / "metrics.json").is_file()]
            summary = {"split": split, "num_images": len(dataset), "model": None}
            if evaluated:
                summary = json.loads((self.output_dir / split / evaluated[-1] / "metrics.json").read_text())
                summary["model"] = evaluated[-1]
            summary.update(table=rows, num_processes=acc.num_processes,
                           best_validation_cider_d=self._best_validation(), timings_seconds=self.timings)
            (self.output_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
            self._plots(dataset)
        acc.wait_for_everyone()
        return broadcast_object_list([rows])[0] if acc.num_processes > 1 else rows

    def _best_validation(self) -> dict:
        scores = {}
        for stage in self.config.stages:
            path = self.output_dir / "best" / stage.name / "validation.json"
            if path.is_file():
                scores[stage.name] = json.loads(path.read_text())["CIDEr-D"]
        return scores

    def _plots(self, dataset):
        """``training_curves.png`` and attention maps of the first ``attention_maps`` images (main process)."""
        from hfcap.visualize import attention_from_generate, attention_map, plot_training_curves

        plot_training_curves(self.output_dir / "log.jsonl", self.output_dir / "training_curves.png")
        grid = getattr(self.model.config, "encoder_grid_size", None)
        count = min(self.config.attention_maps, len(dataset))
        if not grid or not count:
            return
        folder = self.output_dir / "attention"
        folder.mkdir(exist_ok=True)
        rows = dataset.select(range(count))
        pixel_values = self.processor(images=rows["image"], return_tensors="pt")["pixel_values"].to(self.model.device)
        self.model.eval()
        with torch.no_grad():
            output = self.model.generate(pixel_values=pixel_values, **self._generate_kwargs(self.config.test),
                                         output_attentions=True, return_dict_in_generate=True)
        for index, (image, image_id) in enumerate(zip(rows["image"], rows["image_id"])):
            token_ids, attentions = attention_from_generate(output, index, eos_token_id=self.model.config.eos_token_id,
                                                            pad_token_id=self.model.config.pad_token_id)
            words = self.processor.tokenizer.convert_ids_to_tokens(token_ids)
            attention_map(image, words, attentions, grid_size=grid).save(folder / f"image_{int(image_id)}.png")


def train(config: TrainingConfig, *, resume: bool = False) -> dict:
    """Run a training configuration end to end (see ``Trainer``); returns the test metrics of every row."""
    return Trainer(config, resume=resume).train()
