"""The hfcap trainer: cross-entropy (XE) then self-critical (SCST) stages on 🤗 Accelerate, then the test evaluation.

One loop for every setting (1 CPU process, N CPU processes, N GPUs with DDP; fp32/bf16/fp16) and every architecture
of the registry, written out nanoGPT-style; its data lives in ``training.data``, its checkpoint I/O in
``training.checkpoints``, its policy in the stage config (which backbone stages train: ``training.freezing``; label
smoothing: passed to the loss per call; decoding: each stage's and evaluation's ``generate_kwargs``)::

    for stage in config.stages:                   # e.g. [xe, scst]
        freeze backbone stages, prepare(model, optimizer, train loader)   # a fresh optimizer/schedule per stage
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
    features/<stage>/      backbone features cached for a ``cached_features`` stage
    best/<stage>/          save_pretrained of the best model of each stage (by validation CIDEr-D) + validation.json
    model/                 the final model (best of the last stage): model, processor, generation config, provenance
    test/<stage>/          metrics.json, metrics.md, captions_test_results.json of each stage's best model
    metrics.json           the final model's test summary (as `hfcap evaluate` writes it) + "table": all rows
    metrics.md             the test table: trivial baseline, then the best model of each stage
    training_curves.png, attention/*.png

``resume=True`` restores the model, optimizer, schedule, RNG states, stage, epoch, step and data position of the
checkpoint ``checkpoints/latest`` names.
"""

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.tracking import GeneralTracker, on_main_process
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, set_seed

from hfcap.loading import load_captioner

from .checkpoints import (
    CHECKPOINTS,
    TrainerState,
    latest_checkpoint,
    save_checkpoint,
    save_model_directory,
    write_atomically,
)
from .config import StageConfig, TrainingConfig
from .data import (
    Indexed,
    OneCaptionPerImage,
    build_processor,
    caption_pairs,
    load_splits,
    make_collate,
    most_frequent_caption,
)
from .freezing import freeze_backbone

logger = get_logger(__name__, log_level="INFO")

VISUAL_INPUTS = ("pixel_values", "visual_features", "visual_attention_mask")


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


def generate_kwargs_of(settings, *, for_generation_config: bool = False) -> dict:
    """``model.generate`` keyword arguments of a stage or evaluation config: its ``generate_kwargs`` plus, for an
    evaluation, ``num_beams``/``max_new_tokens``/``do_sample=False``, and the authors' beam search when
    ``reference_beam_search`` (not a generation_config value: left out ``for_generation_config``)."""
    from hfcap.generation import reference_beam_search

    kwargs = dict(settings.generate_kwargs)
    if hasattr(settings, "num_beams"):
        kwargs.update(num_beams=settings.num_beams, max_new_tokens=settings.max_new_tokens, do_sample=False)
    if settings.reference_beam_search and not for_generation_config:
        kwargs["custom_generate"] = reference_beam_search
    return kwargs


def build_model(config: TrainingConfig, processor):
    """A new model of ``model.type`` (registry name) from ``model.config`` with the vocabulary and special ids of
    ``processor``, or the ``save_pretrained`` model of ``model.init_from`` (through hfcap's one loader)."""
    from hfcap.errors import configuration_errors
    from hfcap.models import get_architecture

    if config.model.init_from:
        model = load_captioner(config.model.init_from)[0]
        if len(processor.tokenizer) > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {len(processor.tokenizer)} tokens but the model of "
                             f"{config.model.init_from} only {model.config.vocab_size}")
        return model
    architecture = get_architecture(config.model.type)
    tokenizer = processor.tokenizer
    kwargs = dict(config.model.config, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  decoder_start_token_id=tokenizer.bos_token_id)
    try:
        with configuration_errors(f"model.config of {architecture.model_type}"):
            return architecture.model_class(architecture.config_class(**kwargs))
    except TypeError as error:
        raise ValueError(f"model.config is not valid for {architecture.model_type}: {error}") from None


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
        checkpoint = self._prepare_output_dir()
        with acc.main_process_first():
            self.splits = load_splits(config)
        self.processor = build_processor(config, self.splits["train"])
        self.model = build_model(config, self.processor)
        # The saved model's defaults are the test decoding (what `hfcap caption` and the pipeline then use).
        self.model.generation_config.update(**generate_kwargs_of(config.test, for_generation_config=True))
        self.model.to(acc.device)
        acc.init_trackers("logs", config=self._flat_config())
        if acc.is_main_process:
            logger.info(f"{sum(p.numel() for p in self.model.parameters()):,} parameters; train/val/test images: "
                        f"{ {name: len(split) for name, split in self.splits.items()} }; "
                        f"vocabulary {len(self.processor.tokenizer)}; {acc.num_processes} process(es)")
        acc.log({"event": "start", "num_processes": acc.num_processes}, step=0)

        if checkpoint is not None:
            self.state = TrainerState.load(checkpoint)
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
            write_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))

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
        # On cached features the backbone does not run, so it gets no gradients either way.
        freeze_backbone(self.model, 0 if stage.cached_features else stage.trainable_backbone_stages)
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
        if self.config.data.visual_features_dir:  # precomputed features (e.g. M²'s regions) instead of images
            from .feature_cache import CachedFeatureDataset

            rows = CachedFeatureDataset(self.config.data.visual_features_dir, rows)
        elif stage.cached_features:
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
        inputs = {key: batch[key] for key in VISUAL_INPUTS if key in batch}
        if stage.type == "scst":
            from .scst import scst_step

            loss, stats = scst_step(model, inputs, batch["image_index"].tolist(), reward, processor=self.processor,
                                    accelerator=self.accelerator, num_samples=stage.num_samples,
                                    baseline=stage.baseline, max_new_tokens=stage.max_new_tokens,
                                    normalisation=stage.normalisation, generate_kwargs=generate_kwargs_of(stage))
            keep = ("reward_mean", "baseline_mean", "sample_length_mean", "greedy_reward_mean")
            return loss, {key: value for key, value in stats.items() if key in keep}
        smoothing = stage.label_smoothing
        if "caption_counts" not in batch:
            return model(**inputs, labels=batch["labels"], use_cache=False, label_smoothing=smoothing).loss, {}
        with self.accelerator.autocast():
            encoded = self.accelerator.unwrap_model(model).get_encoder()(**inputs, return_dict=True)
        counts = batch["caption_counts"]
        repeated = type(encoded)(**{name: value.repeat_interleave(counts, dim=0)
                                    for name, value in encoded.items() if torch.is_tensor(value)})
        return model(encoder_outputs=repeated, labels=batch["labels"], use_cache=False,
                     label_smoothing=smoothing).loss, {}

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
                                     features_dir=self.config.data.visual_features_dir,
                                     remove_consecutive_duplicates=settings.remove_consecutive_duplicates,
                                     generate_kwargs=generate_kwargs_of(settings), full_metrics=False)
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

    def _save_best(self, stage: StageConfig, score: float):
        """``best/<stage>/``: model + processor + validation.json, replaced atomically."""
        if self.accelerator.is_main_process:
            save_model_directory(self.model, self.processor, self.output_dir / "best" / stage.name, validation={
                "CIDEr-D": score, "step": self.state.step, "global_step": self.state.global_step})
        self.accelerator.wait_for_everyone()

    def _load_best(self, stage_name: str):
        """Replace the model by the best one of stage ``stage_name`` (if that stage kept one)."""
        path = self.output_dir / "best" / stage_name
        if not (path / "config.json").is_file():
            logger.warning(f"no best model of stage {stage_name} to load; keeping the current weights",
                           main_process_only=True)
            return
        self.model = load_captioner(path, self.accelerator.device)[0]

    # ------------------------------------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self):
        stage_name = self.config.stages[self.state.stage_index].name
        save_checkpoint(self.accelerator, self.output_dir, self.state, stage_name, self.config.max_checkpoints)

    # ------------------------------------------------------------------------------------------- final evaluation

    def _final_evaluation(self) -> dict:
        """Save the final model; test the trivial baseline and each stage's best model; write table, curves, maps."""
        from hfcap.metrics import format_metrics_table
        from hfcap.provenance import write_provenance

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
                features_dir=config.data.visual_features_dir,
                remove_consecutive_duplicates=config.test.remove_consecutive_duplicates,
                generate_kwargs=generate_kwargs_of(config.test), output_dir=self.output_dir / split / stage.name,
                split=split, full_metrics=config.test.full_metrics)
        self.timings["test_seconds"] = round(time.perf_counter() - start, 1)
        if acc.is_main_process:
            final_dir = self.output_dir / "model"
            save_model_directory(self.model, self.processor, final_dir)
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
        """``training_curves.png`` and attention maps of the first ``attention_maps`` images (main process; grid
        models only: region features have no grid to draw on)."""
        from hfcap.visualize import save_attention_maps

        from .curves import plot_training_curves

        plot_training_curves(self.output_dir / "log.jsonl", self.output_dir / "training_curves.png")
        count = min(self.config.attention_maps, len(dataset))
        if not count or self.config.data.visual_features_dir or self.model.backbone is None:
            return
        rows = dataset.select(range(count))
        paths = [self.output_dir / "attention" / f"image_{int(image_id)}.png" for image_id in rows["image_id"]]
        save_attention_maps(self.model, self.processor, rows["image"], paths, **generate_kwargs_of(self.config.test))


def train(config: TrainingConfig, *, resume: bool = False) -> dict:
    """Run a training configuration end to end (see ``Trainer``); returns the test metrics of every row."""
    return Trainer(config, resume=resume).train()
