"""The benchmark scripts' `--tiny` modes: every section and code path runs on the CPU and prints its rows (the numbers
themselves come from the full modes on a GPU). Each script runs in a subprocess without `datasets` and `evaluate`,
which the GPU machine lacks."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEER = REPO.parent / "shared" / "peers" / "expansionnet_v2"  # the authors' ExpansionNet v2 code, where present
# Run the script as __main__ with `datasets` and `evaluate` unimportable.
RUNNER = ("import runpy, sys; sys.modules.update(datasets=None, evaluate=None); sys.argv = sys.argv[1:]; "
          "runpy.run_path(sys.argv[0], run_name='__main__')")


def run_tiny(script, tmp_path, *extra):
    output = tmp_path / "results.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.run(
        [sys.executable, "-c", RUNNER, str(REPO / "benchmarks" / script), "--tiny", "--json", str(output), *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert process.returncode == 0, process.stdout[-4000:] + process.stderr[-4000:]
    return process.stdout, json.loads(output.read_text())


def test_bench_captioning_tiny(tmp_path):
    peer_dir = PEER if PEER.is_dir() else tmp_path / "no-peer"
    stdout, results = run_tiny("bench_captioning.py", tmp_path, "--peer-dir", str(peer_dir))
    rows, models = results["rows"], ["expansionnet_v2", "m2_transformer", "m2_transformer-regions", "show_attend_tell"]
    grid = {(r["model"], r["input"], r["precision"], r["method"]) for r in rows if r["section"] == "captioning"}
    for model in models:
        inputs = ["regions"] if model.endswith("regions") else ["pixels", "features"]
        for precision in ("fp32", "bf16-autocast", "bf16-weights"):
            for method in ("greedy", "beam3", "beam5"):
                assert all((model, kind, precision, method) in grid for kind in inputs), (model, precision, method)
        for section in ("cache", "reference", "cpu_latency"):
            assert any(r["section"] == section and r["model"] == model for r in rows), (section, model)
    assert all(r["images_per_s"] and r["backbone_ms"] for r in rows if r["section"] == "captioning"
               and r["input"] == "pixels")
    assert {r["method"] for r in rows if r["section"] == "peer"} == {"greedy", "beam3", "beam5"}  # VisionEncoderDecoder
    assert {r["model"] for r in rows if r["section"] == "bound"} == {"expansionnet_v2", "m2_transformer",
                                                                     "show_attend_tell"}
    fused = [r for r in rows if r["section"] == "fused_attention"]  # (h): the same features up to bf16 rounding
    assert fused and all(r["max_feature_difference"] < 0.05 for r in fused)
    assert not [r for r in rows if r.get("error")]
    assert all(check["passed"] for check in results["checks"]), [c for c in results["checks"] if not c["passed"]]
    for title in ("(a) expansionnet_v2", "(b) transformers VisionEncoderDecoderModel", "(c) hardware bound",
                  "(e) show_attend_tell", "summary: images/s and ratios", "single-image latency on the CPU"):
        assert title in stdout
    if PEER.is_dir():  # (d) the authors' code on hfcap's weights: same first-step log-probs, same best beams
        searches = {r["search"] for r in rows if r["section"] == "authors"}
        assert searches == {"authors' beam_search", "hfcap reference_beam_search", "HF beam search"}
        assert results["meta"]["authors_first_step_logprob_max_abs_diff"] < 1e-5
        assert any(c["name"].startswith("authors' vs hfcap reference best beam") for c in results["checks"])
        assert any(r["section"] == "cpu_latency" and r["search"] == "authors' beam_search" for r in rows)


def test_bench_training_tiny(tmp_path):
    stdout, results = run_tiny("bench_training.py", tmp_path)
    rows = {(r["setup"], r["step"], r["precision"]): r for r in results["rows"]}
    for setup in ("expansionnet_v2-pixels", "expansionnet_v2-features", "m2_transformer-regions"):
        for precision in ("bf16", "fp32"):
            for step in ("xe", "scst"):
                assert rows[setup, step, precision]["samples_per_s"] > 0
            assert 0 < rows[setup, "scst", precision]["reward_share"] < 1
            pycoco = rows[setup, "scst-pycoco", precision]  # measured, or "n/a" without pycocoevalcap
            assert pycoco.get("samples_per_s") or pycoco["error"].startswith("n/a")
    assert "reward %" in stdout


def test_check_cuda_dry_run_on_the_cpu():
    """benchmarks/check_cuda.py, which compares CUDA with the CPU on a GPU machine, passes its checks on the CPU
    alone (SAT's fixtures, ExpansionNet v2's static cache against the dynamic one)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.run(
        [sys.executable, "-c", RUNNER, str(REPO / "benchmarks" / "check_cuda.py"), "--device", "cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert process.returncode == 0, process.stdout[-4000:] + process.stderr[-4000:]
    assert "(e) ExpansionNet v2 static cache: a call under inference_mode" in process.stdout
    assert " 0 failed" in process.stdout


def test_bench_expansionnet_v2_cache_tiny():
    """The cache benchmark's `--tiny` mode: uncached, growing-cache and static-cache decoding agree at every length."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.run(
        [sys.executable, "-c", RUNNER, str(REPO / "benchmarks" / "bench_expansionnet_v2_cache.py"), "--tiny"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert process.returncode == 0, process.stdout[-4000:] + process.stderr[-4000:]
    assert all(f"{length} tokens: static == uncached" in process.stdout for length in (10, 20, 40))
