"""Trainer tests: config parsing, schedules, checkpoints, data modes, a short end-to-end run, plateau decay and
early stopping, NaN detection, resume after a kill.

The runs use a tiny Show-Attend-Tell (a timm test CNN of ~0.1M parameters at 32 px) on 24 generated scenes.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hfcap.training.config import StageConfig, TrainingConfig
from hfcap.training.checkpoints import LATEST, STATE_FILE, latest_checkpoint
from hfcap.training.data import most_frequent_caption
from hfcap.training.trainer import LRSchedule

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "examples" / "configs").glob("*.yaml"))
METRIC_KEYS = {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"}


def tiny_config(output_dir, cache_dir, **top) -> dict:
    """A run of a few seconds per stage: 24 training scenes at 32 px, XE (2 epochs) then 2 SCST steps."""
    config = {
        "output_dir": str(output_dir),
        "num_threads": 1,
        "data": {"name": "scenes", "num_train": 24, "num_val": 8, "num_test": 8, "scenes_image_size": 32,
                 "cache_dir": str(cache_dir), "xe_captions": "grouped"},
        "processor": {"image_size": 32, "min_word_frequency": 1, "max_caption_length": 30},
        "model": {"type": "show_attend_tell",
                  "config": {"backbone": "test_efficientnet", "visual_feature_dim": 64,
                             "encoder_grid_size": 2, "attention_dim": 32, "embed_dim": 32, "d_model": 48,
                             "dropout": 0.0}},
        "stages": [
            {"name": "xe", "type": "xe", "epochs": 2, "batch_size": 8, "lr": 3e-3, "clip_grad_norm": 5.0},
            {"name": "scst", "type": "scst", "max_steps": 2, "batch_size": 4, "lr": 1e-4, "num_samples": 3,
             "max_new_tokens": 8, "init_from_best": True},
        ],
        "validation": {"num_beams": 1, "max_new_tokens": 8},
        "test": {"num_beams": 2, "max_new_tokens": 8},
        "save_every_steps": 2,
        "log_every_steps": 1,
        "attention_maps": 2,
        "report_to": [],
    }
    config.update(top)
    return config


def write_config(path, config) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def subprocess_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false"}


_SHARED = {}  # built once per session, also for test_training_distributed.py (which imports this module)


@pytest.fixture
def cache_dir(tmp_path_factory):
    """The tiny scenes dataset (24/8/8 images at 32 px)."""
    from hfcap.data import load_scenes

    if "scenes" not in _SHARED:
        folder = tmp_path_factory.mktemp("scenes")
        load_scenes(folder, num_train=24, num_val=8, num_test=8, image_size=32, num_workers=1)
        _SHARED["scenes"] = folder
    return _SHARED["scenes"]


@pytest.fixture
def single_process_run(tmp_path_factory, cache_dir):
    """One in-process end-to-end run (XE + SCST + test evaluation); returns its output directory."""
    from hfcap.training import train

    if "run" not in _SHARED:
        output_dir = tmp_path_factory.mktemp("run") / "out"
        train(TrainingConfig.from_dict(tiny_config(output_dir, cache_dir, report_to=["tensorboard"])))
        _SHARED["run"] = output_dir
    return _SHARED["run"]


# ----------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_example_config_parses(path):
    config = TrainingConfig.load(path)
    assert config.stages and all(isinstance(stage, StageConfig) for stage in config.stages)
    assert TrainingConfig.from_dict(config.to_dict()) == config


def test_example_configs_carry_the_authors_recipes():
    sat = TrainingConfig.load(REPO / "examples/configs/sat_coco.yaml").stage("xe")
    assert (sat.optimizer, sat.lr, sat.batch_size, sat.clip_grad_value) == ("adam", 4e-4, 32, 5.0)
    assert (sat.schedule, sat.plateau_patience, sat.plateau_factor, sat.patience) == ("plateau", 8, 0.8, 20)
    m2 = TrainingConfig.load(REPO / "examples/configs/m2_coco.yaml")
    assert (m2.stage("xe").schedule, m2.stage("xe").warmup_steps, m2.stage("xe").betas) == ("noam", 10000, [0.9, 0.98])
    assert (m2.stage("scst").lr, m2.stage("scst").baseline, m2.stage("scst").num_samples) == (5e-6, "beam_mean", 5)
    enet = TrainingConfig.load(REPO / "examples/configs/expansionnet_v2_coco.yaml")
    assert [s.cached_features for s in enet.stages[:3]] == [True, False, True]
    assert {s.optimizer for s in enet.stages} == {"radam"}
    assert (enet.stages[2].baseline, enet.stages[2].num_samples) == ("mean_of_others", 5)


def test_overrides_address_stages_by_name_or_index_and_parse_yaml_values(tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "out", tmp_path))
    config = TrainingConfig.load(path, ["xe.lr=1e-3", "stages.1.num_samples=5", "stages.scst.include_eos=false",
                                        "data.max_train_images=10", "stages.xe.betas=[0.8, 0.9]"])
    assert config.stage("xe").lr == 1e-3 and config.stage("xe").betas == [0.8, 0.9]
    assert config.stage("scst").num_samples == 5 and config.stage("scst").include_eos is False
    assert config.data.max_train_images == 10


@pytest.mark.parametrize("override, message", [
    ("stages.xe.lrr=1", "unknown config key 'stages.xe.lrr' (did you mean 'lr'?)"),
    ("data.num_train=many", "data.num_train must be of type int"),
    ("stages.xe.schedule=cosine", "stages.xe.schedule must be one of"),
    ("stages.bogus.lr=1", "no stage with that index or name"),
    ("stages.scst.baseline=best", "stages.scst.baseline must be one of"),
    ("lr", "must look like key=value"),
    ("model.config.decoder_dim=48", "model.config.decoder_dim is not a ShowAttendTellConfig setting"),
    ("model.config.d_modle=48", "(did you mean 'd_model'?)"),
])
def test_bad_overrides_name_the_key(tmp_path, override, message):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "out", tmp_path))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        TrainingConfig.load(path, [override])


def test_unknown_model_type_is_reported_before_any_data_is_loaded(tmp_path, capsys):
    from hfcap.cli import main

    config = tiny_config(tmp_path / "out", tmp_path / "no-dataset-here")
    config["model"] = {"type": "show_and_tell", "config": {}}
    code = main(["train", "--config", str(write_config(tmp_path / "c.yaml", config))])
    assert code == 2
    assert "unknown architecture 'show_and_tell'; hfcap has: show-attend-tell" in capsys.readouterr().err
    assert not (tmp_path / "no-dataset-here").exists()


# -------------------------------------------------------------------------------------------------- schedules


def test_noam_schedule_peaks_at_the_warmup_step():
    stage = StageConfig(schedule="noam", lr=1.0, warmup_steps=100, noam_model_dim=512)
    schedule = LRSchedule(stage, steps_per_epoch=10, total_steps=1000)
    values = [schedule(step) for step in range(300)]
    assert max(range(300), key=values.__getitem__) == 99  # s = step + 1 = warmup
    assert values[99] == pytest.approx(512 ** -0.5 * 100 ** -0.5)
    assert values[0] == pytest.approx(512 ** -0.5 * 100 ** -1.5)


def test_warmup_anneal_schedule_is_expansionnet_v2s():
    stage = StageConfig(schedule="warmup_anneal", lr=2e-4, warmup_steps=10, anneal_every_epochs=2,
                        anneal_factor=0.8, min_lr=5e-7)
    schedule = LRSchedule(stage, steps_per_epoch=5, total_steps=100)
    assert schedule(0) == pytest.approx(1 / 10)  # hyperbolic warmup: lr / (W - it)
    assert schedule(9) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(0.8)  # it 10 = epoch 2 → one anneal
    assert schedule(30) == pytest.approx(0.8 ** 3)
    assert schedule(10**6) == pytest.approx(5e-7 / 2e-4)  # floored at min_lr


def test_linear_schedule_warms_up_then_decays_to_zero():
    schedule = LRSchedule(StageConfig(schedule="linear", warmup_steps=4), steps_per_epoch=10, total_steps=20)
    assert [schedule(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert schedule(12) == pytest.approx(0.5) and schedule(20) == 0.0


# ------------------------------------------------------------------------------------------------ checkpoints


def test_only_a_complete_checkpoint_named_by_latest_is_resumed(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "00000004-xe-e0-b4").mkdir(parents=True)
    (root / "00000004-xe-e0-b4" / STATE_FILE).write_text("{}")
    (root / "00000009-xe-e1-b1").mkdir()  # a newer, unfinished save (no trainer_state.json)
    (root / ".tmp-00000011-xe-e1-b3").mkdir()
    assert latest_checkpoint(tmp_path) is None  # no pointer yet: nothing to resume
    (root / LATEST).write_text("00000004-xe-e0-b4")
    assert latest_checkpoint(tmp_path) == root / "00000004-xe-e0-b4"
    (root / LATEST).write_text("00000009-xe-e1-b1")
    with pytest.raises(FileNotFoundError, match="missing or incomplete"):
        latest_checkpoint(tmp_path)


def test_most_frequent_caption_normalises_case_and_spaces():
    split = {"captions": [["A red  circle", "two squares"], ["a red circle", "a blue star"]]}
    assert most_frequent_caption(split) == "a red circle"


@pytest.mark.parametrize("mode, rows, captions_per_batch", [("pairs", 24 * 5, 8), ("one_per_image", 24, 8),
                                                            ("grouped", 24, 8 * 5)])
def test_xe_caption_modes_build_the_documented_rows(tmp_path, cache_dir, mode, rows, captions_per_batch):
    from hfcap.training.trainer import Trainer, build_processor, load_splits

    config = tiny_config(tmp_path / "out", cache_dir)
    config["data"]["xe_captions"] = mode
    config = TrainingConfig.from_dict(config)
    trainer = Trainer(config)
    trainer.splits = load_splits(config)
    trainer.processor = build_processor(config, trainer.splits["train"])
    loader = trainer._train_loader(config.stage("xe"))
    assert len(loader.dataset) == rows
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (8, 3, 32, 32) and batch["labels"].shape[0] == captions_per_batch
    if mode == "one_per_image":
        dataset = loader.dataset
        first = [dataset[i]["caption"] for i in range(len(dataset))]
        assert first == [dataset[i]["caption"] for i in range(len(dataset))]  # reproducible within an epoch
        dataset.set_epoch(1)
        assert first != [dataset[i]["caption"] for i in range(len(dataset))]  # redrawn every epoch
        assert all(dataset[i]["caption"] in trainer.splits["train"][i]["captions"] for i in range(len(dataset)))


# -------------------------------------------------------------------------------------------------- end to end


def test_short_run_writes_model_metrics_table_curves_and_attention_maps(single_process_run):
    out = single_process_run
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["num_processes"] == 1 and summary["split"] == "test" and summary["num_images"] == 8
    assert list(summary["table"]) == ["baseline (most frequent caption)", "xe", "scst"]
    for row in summary["table"].values():
        assert METRIC_KEYS <= set(row) and all(math.isfinite(v) for v in row.values() if v is not None)
    assert summary["model"] == "scst" and summary["metrics"] == summary["table"]["scst"]
    from hfcap.hub import read_metrics

    assert read_metrics(out / "metrics.json").metrics["CIDEr-D"] == summary["metrics"]["CIDEr-D"]  # hfcap push
    table = (out / "metrics.md").read_text()
    assert "CIDEr-D" in table and "baseline (most frequent caption)" in table and "scst" in table
    for name in ("config.json", "model.safetensors", "generation_config.json", "processor_config.json",
                 "tokenizer.json"):
        assert (out / "model" / name).is_file(), name
    provenance = json.loads((out / "model" / "hfcap_provenance.json").read_text())  # for hfcap push's card
    assert provenance["weights"] == "trained" and provenance["dataset"] == "scenes" and "xe" in provenance["recipe"]
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "attention").glob("*.png"))) == 2
    assert list((out / "logs").rglob("events.out.tfevents.*")), "TensorBoard events"
    for stage in ("xe", "scst"):
        assert json.loads((out / "test" / stage / "metrics.json").read_text())["metrics"].keys() >= METRIC_KEYS
        assert (out / "best" / stage / "validation.json").is_file()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(r.get("stage") == "xe" and "loss" in r for r in records)
    assert any(r.get("stage") == "scst" and "reward" in r for r in records)
    assert sum("val_CIDEr-D" in r for r in records) >= 3  # 2 XE epochs + the SCST stage end
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(steps) and steps[-1] == 6 + 2  # 3 XE steps per epoch x 2, then 2 SCST steps
    assert (out / "checkpoints" / LATEST).read_text().endswith("-scst-e0-b2-done")


def test_saved_model_generates_through_the_auto_classes(single_process_run):
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import hfcap  # noqa: F401

    model = AutoModelForImageTextToText.from_pretrained(single_process_run / "model")
    processor = AutoProcessor.from_pretrained(single_process_run / "model")
    assert model.generation_config.num_beams == 2 and model.generation_config.max_new_tokens == 8
    pixel_values = processor(images=Image.new("RGB", (32, 32), "red"), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        sequences = model.generate(pixel_values=pixel_values)
    assert sequences.shape[0] == 1 and isinstance(processor.batch_decode(sequences)[0], str)


def test_plateau_decay_and_early_stopping_follow_the_validation_cider(tmp_path, cache_dir):
    from hfcap.training import train

    config = tiny_config(tmp_path / "out", cache_dir)
    # lr 1e-12 and a backbone without BatchNorm statistics: the validation CIDEr-D never improves after epoch 1
    config["model"]["config"].update(backbone="test_convnext")
    config["stages"] = [{"name": "xe", "type": "xe", "epochs": 10, "batch_size": 8, "lr": 1e-12,
                         "schedule": "plateau", "plateau_patience": 1, "plateau_factor": 0.5, "patience": 2}]
    config["test"]["full_metrics"] = False
    train(TrainingConfig.from_dict(config))
    records = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    scores = [r["val_CIDEr-D"] for r in records if "val_CIDEr-D" in r]
    assert len(scores) == 3 and len(set(scores)) == 1  # best, then 2 validations without improvement: stop
    learning_rates = [r["lr"] for r in records if "loss" in r]  # logged after each step: the next step's lr
    assert learning_rates == pytest.approx([1e-12] * 6 + [5e-13] * 3, rel=1e-6)


def test_stages_on_cached_features_then_end_to_end(tmp_path, cache_dir):
    """ExpansionNet v2's recipe shape: XE on backbone features cached once, XE end to end, SCST on fresh features."""
    from hfcap.training import train

    config = tiny_config(tmp_path / "out", cache_dir)
    config["stages"] = [
        {"name": "xe_cached", "type": "xe", "cached_features": True, "max_steps": 2, "batch_size": 8, "lr": 3e-3},
        {"name": "xe_end_to_end", "type": "xe", "max_steps": 2, "batch_size": 8, "lr": 1e-3},
        {"name": "scst_cached", "type": "scst", "cached_features": True, "max_steps": 1, "batch_size": 4,
         "num_samples": 2, "max_new_tokens": 8, "lr": 1e-4},
    ]
    config["test"]["full_metrics"] = False
    rows = train(TrainingConfig.from_dict(config))
    assert list(rows) == ["baseline (most frequent caption)", "xe_cached", "xe_end_to_end", "scst_cached"]
    for stage in ("xe_cached", "scst_cached"):
        index = json.loads((tmp_path / "out" / "features" / stage / "features.json").read_text())
        assert index["num_images"] == 24 and index["num_positions"] == 4 and index["dim"] == 64


def test_nan_loss_stops_the_run_naming_the_step(tmp_path, cache_dir):
    from hfcap.training import train

    config = tiny_config(tmp_path / "out", cache_dir)
    config["stages"][0].update(lr=1e30, clip_grad_norm=None)
    with pytest.raises(FloatingPointError, match=r"training diverged: .* in stage 'xe' at optimizer step \d+ "):
        train(TrainingConfig.from_dict(config))


def test_resume_after_kill_continues_from_the_saved_step(tmp_path, cache_dir):
    config = tiny_config(tmp_path / "out", cache_dir, mixed_precision="bf16")  # bf16 autocast on CPU, too
    config["stages"][0]["epochs"] = 12  # long enough to be killed mid-stage
    config["test"]["full_metrics"] = False
    path = write_config(tmp_path / "c.yaml", config)
    command = [sys.executable, str(REPO / "examples" / "train.py"), "--config", str(path)]
    pointer = tmp_path / "out" / "checkpoints" / LATEST
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not pointer.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    output = process.communicate()[0].decode()
    assert pointer.is_file(), output[-3000:]
    checkpoint = latest_checkpoint(tmp_path / "out")
    saved = json.loads((checkpoint / STATE_FILE).read_text())["state"]
    assert saved["stage_index"] == 0 and not saved["stage_done"] and saved["step"] >= 2
    # leftovers of a save that crashed half-way must never be picked up
    (checkpoint.parent / ".tmp-99999999-xe-e9-b9").mkdir()
    (checkpoint.parent / "99999999-xe-e9-b9").mkdir()

    resumed = subprocess.run(command + ["--resume", "stages.xe.epochs=3"], env=subprocess_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    logs = resumed.stdout + resumed.stderr
    assert f"Resuming from {checkpoint}: stage xe, epoch {saved['epoch']}, step {saved['step']}" in logs
    records = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r.get("stage") == "xe" and "loss" in r]
    assert steps == list(range(1, 10))  # each XE step logged once: before the kill, then after the resume
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["table"]["scst"].keys() == {"CIDEr-D"}
