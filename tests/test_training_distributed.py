"""Two CPU processes under ``accelerate launch``: a real 2-process run (hf_stack §8 launch traps) with the outputs of a
single-process run."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from test_training import (  # noqa: F401  (cache_dir, single_process_run: fixtures shared with test_training.py)
    METRIC_KEYS, REPO, cache_dir, single_process_run, subprocess_env, tiny_config, write_config)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_train_together_and_report_the_same_metrics(tmp_path, cache_dir, single_process_run):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "out", cache_dir))
    # --cpu would silently run ONE process; ACCELERATE_USE_CPU + --multi_gpu gives two gloo processes.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(REPO / "examples" / "train.py"), "--config", str(path)]
    result = subprocess.run(command, env={**subprocess_env(), "ACCELERATE_USE_CPU": "true"}, capture_output=True,
                            text=True, timeout=600)
    logs = result.stdout + result.stderr
    assert result.returncode == 0, logs[-4000:]
    assert "process 0 of 2 (MULTI_CPU" in logs and "process 1 of 2 (MULTI_CPU" in logs, logs[-4000:]

    two = json.loads((tmp_path / "out" / "metrics.json").read_text())
    one = json.loads((Path(single_process_run) / "metrics.json").read_text())
    assert two["num_processes"] == 2 and one["num_processes"] == 1
    assert two["table"].keys() == one["table"].keys()
    for row in two["table"]:
        assert two["table"][row].keys() == one["table"][row].keys() and METRIC_KEYS <= two["table"][row].keys()
    # every test image was captioned exactly once although the 8 images were split over 2 processes
    results = json.loads((tmp_path / "out" / "test" / "scst" / "captions_test_results.json").read_text())
    assert sorted(r["image_id"] for r in results) == sorted(r["image_id"] for r in json.loads(
        (Path(single_process_run) / "test" / "scst" / "captions_test_results.json").read_text()))
    # 24 images, batch 8 per process: 2 optimizer steps per XE epoch instead of 3
    records = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("stage") == "xe" and "loss" in r] == [1, 2, 3, 4]
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["output_dir"] == str(tmp_path / "out")
