"""Saved hfcap models are Hub remote code: in a Python process where hfcap cannot be imported, the Auto classes (with
`trust_remote_code=True`), `generate` and transformers' pipeline load them from a local directory and from a (fake)
Hub repository and reproduce hfcap's outputs.

This end-to-end subprocess test runs on one architecture, ExpansionNet v2 (the expensive end-to-end tests rotate:
training resume and two processes on Show-Attend-Tell, the fake-Hub push on M²); the shared model suite checks every
architecture's save/load in process, and tests/test_copies.py that every model folder carries the compat copies its
remote code needs."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import save_images
from hub_server import FakeHub
from model_testers import ExpansionNetV2Tester
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

import hfcap

REPO_ID = "hfcap-test/expansionnet-v2-tiny"
HFCAP = Path(hfcap.__file__).parent
SOURCES = {  # file in the saved repo -> the hfcap source it must be an exact copy of
    "configuration_expansionnet_v2.py": HFCAP / "models/expansionnet_v2/configuration_expansionnet_v2.py",
    "modeling_expansionnet_v2.py": HFCAP / "models/expansionnet_v2/modeling_expansionnet_v2.py",
    "processing_captioning.py": HFCAP / "processing/processing_captioning.py",
}
MODEL_CLASS = "modeling_expansionnet_v2.ExpansionNetV2ForConditionalGeneration"

# Runs in the clean process: argv = model directory, repo id, image path. Prints one JSON line.
CLEAN_PROCESS_SCRIPT = r"""
import json, sys
result = {}
try:
    import hfcap
    result["hfcap_importable"] = True
except ImportError:
    result["hfcap_importable"] = False
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline

model_dir, repo_id, image = sys.argv[1:4]
for name, source in (("dir", model_dir), ("repo", repo_id)):
    out = result[name] = {}
    try:
        AutoModelForImageTextToText.from_pretrained(source)
    except ValueError as error:
        out["without_trust_remote_code"] = str(error)
    config = AutoConfig.from_pretrained(source, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(source, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
    out["classes"] = [type(obj).__module__ + "." + type(obj).__name__ for obj in (config, model, processor)]
    try:
        out["auto_model_class"] = type(AutoModel.from_pretrained(source, trust_remote_code=True)).__name__
    except ValueError as error:
        out["auto_model_class"] = f"ValueError: {str(error)[:200]}"
    inputs = processor(images=image, return_tensors="pt")
    out["beam"] = model.generate(**inputs).tolist()
    out["greedy"] = model.generate(**inputs, num_beams=1, max_new_tokens=5).tolist()
    out["pipeline"] = pipeline("image-text-to-text", model=source, trust_remote_code=True)(image, text="")
print("\nRESULT " + json.dumps(result))
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny ExpansionNet v2 (a 32 px Swin) trained to caption two images, saved by hfcap with its processor, and an
    image."""
    root = tmp_path_factory.mktemp("remote")
    tester = ExpansionNetV2Tester()
    tester.captioner().save_pretrained(root / "model")
    tester.processor().save_pretrained(root / "model")
    return root / "model", save_images(root)[0]


@pytest.fixture(scope="module")
def expected(saved):
    """What hfcap itself produces for the saved model and image."""
    model_dir, image_path = saved
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    inputs = processor(images=Image.open(image_path))
    return {
        "beam": model.generate(**inputs).tolist(),
        "greedy": model.generate(**inputs, num_beams=1, max_new_tokens=5).tolist(),
        "pipeline": pipeline("image-to-text", model=str(model_dir))(str(image_path))[0]["generated_text"],
    }


@pytest.fixture(scope="module")
def clean_process(saved, tmp_path_factory):
    """Seed a fake Hub repo with the saved files and run CLEAN_PROCESS_SCRIPT without hfcap on the path."""
    model_dir, image_path = saved
    home = tmp_path_factory.mktemp("clean-home")
    with FakeHub() as hub:
        hub.seed(REPO_ID, {path.name: path.read_bytes() for path in model_dir.iterdir()})
        # -S skips site-packages' .pth files, among them hfcap's editable-install hook; PYTHONPATH gives back the
        # installed packages (torch, transformers, timm, ...). The working directory is not the repository.
        env = {
            "PATH": os.environ["PATH"], "HOME": str(home), "PYTHONPATH": sysconfig.get_paths()["purelib"],
            "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_fake", "HF_HUB_OFFLINE": "0", "HF_HOME": str(home / "hf"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1",
        }
        process = subprocess.run(
            [sys.executable, "-S", "-c", CLEAN_PROCESS_SCRIPT, str(model_dir), REPO_ID, str(image_path)],
            cwd=home, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
        )
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    assert process.returncode == 0 and lines, process.stdout[-5000:] + process.stderr[-5000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_saved_directory_carries_the_real_source_files(saved):
    model_dir, _ = saved
    for name, source in SOURCES.items():
        assert (model_dir / name).read_bytes() == source.read_bytes(), name


def test_saved_directory_maps_every_auto_class(saved):
    model_dir, _ = saved
    assert json.loads((model_dir / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_expansionnet_v2.ExpansionNetV2Config",
        "AutoModel": MODEL_CLASS,
        "AutoModelForImageTextToText": MODEL_CLASS,
    }
    assert json.loads((model_dir / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_captioning.CaptioningProcessor"
    }


def test_clean_process_cannot_import_hfcap(clean_process):
    assert clean_process["hfcap_importable"] is False


@pytest.mark.parametrize("source", ["dir", "repo"])
def test_remote_code_loads_and_generates_like_hfcap(clean_process, expected, source):
    result = clean_process[source]
    assert "trust_remote_code" in result["without_trust_remote_code"]
    config_class, model_class, processor_class = result["classes"]
    assert config_class.startswith("transformers_modules.") and config_class.endswith(".ExpansionNetV2Config")
    assert model_class.startswith("transformers_modules.") and model_class.endswith(MODEL_CLASS)
    assert processor_class.startswith("transformers_modules.") and processor_class.endswith(".CaptioningProcessor")
    assert result["beam"] == expected["beam"]
    assert result["greedy"] == expected["greedy"]
    assert result["pipeline"] == [{"input_text": "", "generated_text": expected["pipeline"]}]


@pytest.mark.parametrize("source", ["dir", "repo"])
def test_remote_code_automodel(clean_process, source):
    assert clean_process[source]["auto_model_class"] == "ExpansionNetV2ForConditionalGeneration"
