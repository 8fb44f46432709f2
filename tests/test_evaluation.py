"""`hfcap evaluate` / `evaluate_captioner`: result files, id alignment, decoding options, and a 2-process run
(no duplicates, same captions as one process; SCST gradients synchronised under DDP)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TRAIN_CAPTIONS, tiny_sat
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import hfcap
import hfcap.cli
from hfcap.cards import converted_provenance, model_card, read_metrics
from hfcap.data import load_karpathy
from hfcap.provenance import resolve_provenance
from hfcap.training.evaluation import evaluate_captioner, generate_captions, score_captions

REPO = Path(__file__).resolve().parents[1]
NUM_TEST = 5  # odd, so 2 processes x batch 2 get an uneven split
COCO_METRICS = {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny random SAT (model + processor) and a tiny Karpathy dataset: 2 train, 1 val, 5 test images."""
    root = tmp_path_factory.mktemp("evaluation")
    model, processor = tiny_sat()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    images = []
    splits = ["train", "train", "val"] + ["test"] * NUM_TEST
    for index, split in enumerate(splits):
        name = f"img{index}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name)
        captions = TRAIN_CAPTIONS[index % len(TRAIN_CAPTIONS)]
        images.append({"filename": name, "split": split, "imgid": index, "cocoid": 1000 + index,
                       "sentences": [{"raw": c, "tokens": c.split()} for c in captions]})
    (root / "dataset.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return root


def main(argv):
    """`hfcap evaluate ARGS`."""
    return hfcap.cli.main(["evaluate", *argv])


def _cli_args(root, output, *extra):
    return ["--model", str(root / "model"), "--data", "karpathy", "--karpathy-json",
            str(root / "dataset.json"), "--images-root", str(root), "--split", "test", "--batch-size", "2",
            "--max-new-tokens", "5", "--output", str(output), *extra]


def _results(output):
    return {r["image_id"]: r["caption"] for r in json.loads((output / "captions_test_results.json").read_text())}


def test_cli_writes_results_metrics_and_table(setup):
    output = setup / "single"
    assert main(_cli_args(setup, output, "--num-beams", "2")) == 0
    results = json.loads((output / "captions_test_results.json").read_text())
    assert [r["image_id"] for r in results] == [1003, 1004, 1005, 1006, 1007]  # one per image, dataset order
    assert all(set(r) == {"image_id", "caption"} and isinstance(r["caption"], str) for r in results)
    # Each caption is the one the model generates for that very image alone.
    model = AutoModelForImageTextToText.from_pretrained(setup / "model").eval()
    processor = AutoProcessor.from_pretrained(setup / "model")
    for result in results:
        pixel_values = processor(images=setup / f"img{result['image_id'] - 1000}.png")["pixel_values"]
        tokens = model.generate(pixel_values=pixel_values, num_beams=2, max_new_tokens=5)
        assert result["caption"] == processor.batch_decode(tokens, skip_special_tokens=True)[0].strip()
    summary = json.loads((output / "metrics.json").read_text())
    assert summary["split"] == "test" and summary["num_images"] == NUM_TEST
    assert summary["generate_kwargs"] == {"num_beams": 2, "max_new_tokens": 5}
    assert summary["protocol"] == "coco"
    assert COCO_METRICS <= set(summary["metrics"])
    assert all(np.isfinite(value) for value in summary["metrics"].values())
    table = (output / "metrics.md").read_text()
    assert "CIDEr-D" in table and "|" in table


def test_evaluate_captioner_reference_beam_search_and_fast_metrics(setup):
    model, processor = tiny_sat()
    model.train()
    dataset = load_karpathy(setup / "dataset.json", setup)["test"]
    generate_kwargs = {"num_beams": 3, "max_new_tokens": 5, "custom_generate": hfcap.reference_beam_search}
    metrics = evaluate_captioner(model, processor, dataset, batch_size=3, generate_kwargs=generate_kwargs,
                                 output_dir=setup / "fast", full_metrics=False)
    assert set(metrics) == {"CIDEr-D"} and np.isfinite(metrics["CIDEr-D"])
    assert model.training  # mode restored
    results = _results(setup / "fast")
    model.eval()
    for image_id, caption in results.items():
        pixel_values = processor(images=setup / f"img{image_id - 1000}.png")["pixel_values"]
        tokens = model.generate(pixel_values=pixel_values, **generate_kwargs)
        assert caption == processor.batch_decode(tokens, skip_special_tokens=True)[0].strip()
    summary = json.loads((setup / "fast" / "metrics.json").read_text())
    assert summary["generate_kwargs"]["custom_generate"] == "reference_beam_search"
    assert summary["protocol"] == "cider-d-only"


def test_cider_only_run_is_described_as_such_by_the_model_card(setup):
    """`hfcap evaluate --cider-only` records its protocol in metrics.json, and `hfcap push --metrics` turns that into
    the card's description of the evaluation (not the COCO protocol it did not run)."""
    output = setup / "cider_only"
    assert main(_cli_args(setup, output, "--cider-only")) == 0
    summary = json.loads((output / "metrics.json").read_text())
    assert summary["protocol"] == "cider-d-only" and set(summary["metrics"]) == {"CIDEr-D"}
    model = AutoModelForImageTextToText.from_pretrained(setup / "model")
    provenance = resolve_provenance(setup / "model", converted_provenance("show_attend_tell"), weights="trained",
                                    dataset="tiny")
    card = model_card(model.config, {"num_beams": model.generation_config.num_beams}, repo_id="org/sat",
                      provenance=provenance, evaluation=read_metrics(output / "metrics.json"))
    assert "fast mode (`hfcap evaluate --cider-only`): corpus CIDEr-D only" in card.text
    assert "PTB tokenizer, then BLEU" not in card.text
    assert [(result.metric_name, result.dataset_split) for result in card.data.eval_results] == [("CIDEr-D", "test")]


def test_fast_cider_scores_references_above_nonsense():
    references = {1: ["a red circle on the left", "a red circle"], 2: ["a blue square at the top", "one blue square"],
                  3: ["two green triangles", "green triangles on the right"]}
    good = score_captions({1: "a red circle", 2: "one blue square", 3: "two green triangles"}, references,
                          full_metrics=False)["CIDEr-D"]
    bad = score_captions({1: "zebra", 2: "zebra", 3: "zebra"}, references, full_metrics=False)["CIDEr-D"]
    assert bad == 0.0 and good > 1.0


def test_duplicate_image_ids_are_rejected(setup):
    from datasets import concatenate_datasets

    model, processor = tiny_sat()
    test = load_karpathy(setup / "dataset.json", setup)["test"]
    with pytest.raises(ValueError, match="duplicate image_id"):
        generate_captions(model, processor, concatenate_datasets([test, test.select([0])]))


def test_cli_errors(setup, capsys):
    assert main(["--model", str(setup / "missing"), "--output", str(setup / "x")]) == 3
    assert "model directory not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # argparse: --max-images takes a positive integer
        main(_cli_args(setup, setup / "x", "--max-images", "0"))
    assert exited.value.code == 2 and "--max-images: must be a positive integer" in capsys.readouterr().err
    assert main(["--model", str(setup / "model"), "--data", "karpathy", "--output", str(setup / "x")]) == 2
    assert "--karpathy-json" in capsys.readouterr().err
    assert main(_cli_args(setup, setup / "x")[:-4] + ["--split", "dev", "--output", str(setup / "x")]) == 2
    assert "split 'dev' not found" in capsys.readouterr().err


DISTRIBUTED_SCRIPT = """
import json, sys
import torch
from accelerate import Accelerator
sys.path.insert(0, {tests!r})
from hfcap.training.scst import ScstReward, scst_step
from conftest import TRAIN_CAPTIONS, tiny_sat
from test_evaluation import main

assert main({cli_args!r}) == 0
accelerator = Accelerator()
model, processor = tiny_sat()
model.train()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
model, optimizer = accelerator.prepare(model, optimizer)
torch.manual_seed(accelerator.process_index)  # different images and samples on each process
pixel_values = torch.randn(2, 3, 32, 32)
loss, stats = scst_step(model, {{"pixel_values": pixel_values}}, [accelerator.process_index, 2],
                        ScstReward(TRAIN_CAPTIONS), processor=processor, accelerator=accelerator, num_samples=3,
                        max_new_tokens=5)
accelerator.backward(loss)
grad = accelerator.unwrap_model(model).decoder.fc.weight.grad.flatten()[None]
grads = accelerator.gather(grad)
losses = accelerator.gather(loss.detach()[None])
if accelerator.is_main_process:
    json.dump({{"num_processes": accelerator.num_processes, "wrapped": type(model).__name__,
               "grads_equal": bool(torch.allclose(grads[0], grads[1])), "losses": losses.tolist()}},
              open({report!r}, "w"))
"""


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_no_duplicates_and_scst_gradients_synchronised(setup):
    output, report = setup / "distributed", setup / "report.json"
    script = setup / "distributed_check.py"
    script.write_text(DISTRIBUTED_SCRIPT.format(tests=str(Path(__file__).resolve().parent), report=str(report),
                                                cli_args=_cli_args(setup, output, "--cider-only")))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(script)]
    completed = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    facts = json.loads(report.read_text())
    assert facts["num_processes"] == 2 and facts["wrapped"] == "DistributedDataParallel"
    assert facts["losses"][0] != facts["losses"][1]  # the processes saw different data ...
    assert facts["grads_equal"]  # ... and DDP averaged their gradients
    results = json.loads((output / "captions_test_results.json").read_text())
    assert sorted(r["image_id"] for r in results) == [1003, 1004, 1005, 1006, 1007]  # exactly one per image
    single = setup / "single_greedy"
    assert main(_cli_args(setup, single, "--cider-only")) == 0
    assert _results(output) == _results(single)
    assert json.loads((output / "metrics.json").read_text())["metrics"] == pytest.approx(
        json.loads((single / "metrics.json").read_text())["metrics"])
