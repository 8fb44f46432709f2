"""Sharing on the Hub: model cards (template, metadata, model-index from metrics.json, provenance), `hfcap push` errors,
and push -> pull round trips against the fake Hub (`hfcap push`, `model.push_to_hub`, `processor.push_to_hub`).

The fake-Hub round trip (a subprocess) runs on M² from pixels (the expensive end-to-end tests rotate between the
architectures); the card tests use a tiny Show-Attend-Tell and the cards of all three."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_images, save_tiny_captioner
from hub_server import USER, FakeHub
from model_testers import M2TransformerPixelsTester
from huggingface_hub import ModelCard
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

from hfcap import cards
from hfcap.cards import converted_provenance, model_card, read_metrics
from hfcap.cli import main as hfcap_cli
from hfcap.models import ARCHITECTURES
from hfcap.provenance import PROVENANCE_FILE, resolve_provenance, write_provenance

ROOT = Path(__file__).resolve().parents[1]
SAT_RELEASED = converted_provenance("show_attend_tell")
METRICS = {"BLEU-1": 0.7012, "BLEU-2": 0.5321, "BLEU-3": 0.3903, "BLEU-4": 0.2845, "METEOR": 0.2412,
           "ROUGE-L": 0.5233, "CIDEr-D": 0.9118}
SUMMARY = {"split": "test", "num_images": 500, "generate_kwargs": {"num_beams": 3}, "protocol": "coco",
           "metrics": METRICS}
PUSHED_NAME, MIXIN_REPO, STALE_REPO = "m2-tiny", "hfcap-test/m2-tiny-mixin", "hfcap-test/m2-sharded"
PUSHED_REPO = f"{USER}/{PUSHED_NAME}"  # pushed without a namespace: the token's user
STALE_FILES = {  # an earlier, sharded upload in STALE_REPO
    ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
    "model-00001-of-00002.safetensors": b"old", "model-00002-of-00002.safetensors": b"old",
    "model.safetensors.index.json": b"{}", "README.md": b"old card\n", "notes.txt": b"kept\n",
}
TRAINED = ["--weights", "trained", "--dataset", "hfcap scenes", "--recipe", "XE, 2 epochs"]

# Runs with hfcap importable against the fake Hub: argv = model dir, metrics.json, image. Prints one JSON line.
HUB_SCRIPT = r"""
import json, sys
import hfcap
from hfcap.cli import main as hfcap_cli
from huggingface_hub import HfApi, ModelCard
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

model_dir, metrics, image = sys.argv[1:4]
result = {"push_rc": hfcap_cli(["push", model_dir, "--repo-id", "%(pushed_name)s", "--private", "--metrics", metrics,
                                "--weights", "trained", "--dataset", "hfcap scenes", "--recipe", "XE, 2 epochs"])}


def tokens(repo_id):
    model = AutoModelForImageTextToText.from_pretrained(repo_id).eval()
    processor = AutoProcessor.from_pretrained(repo_id)
    inputs = processor(images=image)
    return {"beam": model.generate(**inputs).tolist(),
            "greedy": model.generate(**inputs, num_beams=1, max_new_tokens=5).tolist()}


result["stale_push_rc"] = hfcap_cli(["push", model_dir, "--repo-id", "%(stale)s", "--weights", "converted"])
result["pulled"] = tokens("%(pushed)s")
card = ModelCard.load("%(pushed)s")
result["card"] = {"metadata": card.data.to_dict(), "text": card.text,
                  "eval_results": [[r.metric_name, r.metric_type, r.metric_value, r.dataset_name, r.dataset_split]
                                   for r in card.data.eval_results]}
result["private"] = HfApi().model_info("%(pushed)s").private
result["pipeline"] = pipeline("image-to-text", model="%(pushed)s")(image)

model = AutoModelForImageTextToText.from_pretrained(model_dir)
model.push_to_hub("%(mixin)s")
AutoProcessor.from_pretrained(model_dir).push_to_hub("%(mixin)s")
result["mixin"] = tokens("%(mixin)s")
print("\nRESULT " + json.dumps(result))
""" % {"pushed_name": PUSHED_NAME, "pushed": PUSHED_REPO, "mixin": MIXIN_REPO, "stale": STALE_REPO}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_captioner(tmp_path_factory.mktemp("hub") / "model")


@pytest.fixture(scope="module")
def pushed_dir(tmp_path_factory):
    """The M² (pixels, timm test_resnet) that the round trip pushes: trained to caption two images, with its
    processor."""
    directory = tmp_path_factory.mktemp("hub") / "m2"
    tester = M2TransformerPixelsTester()
    tester.captioner().save_pretrained(directory)
    tester.processor().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def metrics_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "metrics.json"
    path.write_text(json.dumps(SUMMARY))
    return path


@pytest.fixture(scope="module")
def round_trip(pushed_dir, metrics_file, tmp_path_factory):
    """Run HUB_SCRIPT against a fresh fake Hub; returns (its JSON result, the Hub's repos, the image path)."""
    home = tmp_path_factory.mktemp("hub-home")
    image = save_images(home)[0]
    with FakeHub() as fake_hub:
        fake_hub.seed(STALE_REPO, STALE_FILES)
        env = {
            "PATH": os.environ["PATH"], "HOME": str(home), "HF_ENDPOINT": fake_hub.url, "HF_TOKEN": "hf_fake",
            "HF_HUB_OFFLINE": "0", "HF_HOME": str(home / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1",
            "OMP_NUM_THREADS": "1",
        }
        process = subprocess.run(
            [sys.executable, "-c", HUB_SCRIPT, str(pushed_dir), str(metrics_file), str(image)],
            cwd=home, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
        )
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    assert process.returncode == 0 and lines, process.stdout[-5000:] + process.stderr[-5000:]
    return json.loads(lines[-1].removeprefix("RESULT ")), fake_hub.repos, image


@pytest.fixture(scope="module")
def local_tokens(pushed_dir, round_trip):
    model = AutoModelForImageTextToText.from_pretrained(pushed_dir).eval()
    inputs = AutoProcessor.from_pretrained(pushed_dir)(images=Image.open(round_trip[2]))
    return {"beam": model.generate(**inputs).tolist(),
            "greedy": model.generate(**inputs, num_beams=1, max_new_tokens=5).tolist()}


# --- hfcap push: one commit with everything, then from_pretrained / card / pipeline from the repo id --------------


def test_hfcap_push_makes_one_commit_with_model_processor_code_and_card(round_trip):
    result, repos, _ = round_trip
    assert result["push_rc"] == 0
    repo = repos[PUSHED_REPO]
    assert repo.private and result["private"] is True
    initial, pushed = repo.commits  # the Hub's initial commit, then exactly one commit for the push
    assert set(pushed.files) - set(initial.files) == {
        "config.json", "generation_config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
        "tokenizer_config.json", "configuration_m2_transformer.py", "modeling_m2_transformer.py",
        "processing_captioning.py", "hfcap_provenance.json", "README.md",
    }
    generation = json.loads(pushed.files["generation_config.json"])
    assert (generation["num_beams"], generation["max_new_tokens"]) == (5, 20)
    provenance = json.loads(pushed.files["hfcap_provenance.json"])
    assert provenance["weights"] == "trained" and provenance["dataset"] == "hfcap scenes"


def test_push_to_an_existing_repo_replaces_the_model_files(round_trip):
    result, repos, _ = round_trip
    assert result["stale_push_rc"] == 0
    seeded, pushed = repos[STALE_REPO].commits
    assert not repos[STALE_REPO].private
    assert {"model.safetensors", "modeling_m2_transformer.py", ".gitattributes", "notes.txt"} <= set(pushed.files)
    assert not {"model-00001-of-00002.safetensors", "model.safetensors.index.json"} & set(pushed.files)
    assert pushed.files["README.md"].startswith(b"---\n") and b"Converted from" in pushed.files["README.md"]


def test_pulled_model_generates_the_same_tokens(round_trip, local_tokens):
    assert round_trip[0]["pulled"] == local_tokens


def test_pushed_card_round_trips_metadata_and_metrics(round_trip):
    card = round_trip[0]["card"]
    metadata = card["metadata"]
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-text-to-text"
    assert {"image-captioning", "hfcap", "m2-transformer"} <= set(metadata["tags"])
    assert metadata["license"] == "apache-2.0"
    assert sorted(metadata["metrics"]) == ["bleu", "cider", "meteor", "rouge"]
    assert {name: value for name, _, value, _, _ in card["eval_results"]} == METRICS
    assert {(dataset, split) for *_, dataset, split in card["eval_results"]} == {("hfcap scenes", "test")}
    assert "Trained by hfcap" in card["text"] and "XE, 2 epochs" in card["text"]
    assert "| 0.2845 |" in card["text"]  # hfcap's BLEU-4 in the measured table
    assert "| paper, single model | 80.8 |" in card["text"]  # the authors' table, outside the model-index
    assert f'pipeline("image-to-text", model="{PUSHED_REPO}")' in card["text"]


def test_pipeline_from_repo_id(round_trip, pushed_dir):
    result, _, image = round_trip
    assert result["pipeline"] == pipeline("image-to-text", model=str(pushed_dir))(str(image))


def test_model_and_processor_push_to_hub(round_trip, local_tokens):
    result, repos, _ = round_trip
    files = repos[MIXIN_REPO].commits[-1].files
    assert {"modeling_m2_transformer.py", "processing_captioning.py", "processor_config.json"} <= set(files)
    assert result["mixin"] == local_tokens


@pytest.mark.parametrize("repo_id", [PUSHED_REPO, MIXIN_REPO])
def test_pushed_repos_map_every_auto_class(round_trip, repo_id):
    files = round_trip[1][repo_id].commits[-1].files
    assert set(json.loads(files["config.json"])["auto_map"]) == {
        "AutoConfig", "AutoModel", "AutoModelForImageTextToText"
    }
    assert json.loads(files["processor_config.json"])["auto_map"] == {
        "AutoProcessor": "processing_captioning.CaptioningProcessor"
    }


def generation_defaults(model):
    """What `hfcap push` puts in the card's details: the model's values of its architecture's generation defaults."""
    return {name: getattr(model.generation_config, name) for name in ARCHITECTURES[model.config.model_type].generation_defaults}


# --- model cards ----------------------------------------------------------------------------------------------------


def test_card_from_metrics_json(model_dir, metrics_file):
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    provenance = resolve_provenance(model_dir, SAT_RELEASED, weights="converted")
    card = model_card(model.config, generation_defaults(model), repo_id="org/sat", provenance=provenance,
                          evaluation=read_metrics(metrics_file))
    reloaded = ModelCard(str(card))
    assert reloaded.data.datasets == ["yerevann/coco-karpathy"]
    assert reloaded.data.license == "mit"
    assert {result.metric_name: result.metric_value for result in reloaded.data.eval_results} == METRICS
    assert {result.dataset_name for result in reloaded.data.eval_results} == {"COCO (Karpathy split)"}
    for section in ("## Intended use", "## How the weights were obtained", "## Training data", "## Training recipe",
                    "## Evaluation", "## Limitations and biases", "## Citation"):
        assert section in reloaded.text
    assert "Converted from the tutorial author's released checkpoint" in reloaded.text
    assert "`num_beams=5`, `max_new_tokens=51`" in reloaded.text
    assert 'pipeline("image-to-text", model="org/sat")' in reloaded.text
    flickr = model_card(model.config, generation_defaults(model), repo_id="org/sat", provenance=provenance,
                            evaluation=read_metrics(metrics_file), eval_dataset="Flickr8k")
    assert {(result.dataset_type, result.dataset_name) for result in flickr.data.eval_results} == {
        ("Flickr8k", "Flickr8k")
    }


def test_card_without_metrics_has_no_model_index(model_dir):
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    provenance = resolve_provenance(model_dir, SAT_RELEASED, weights="converted")
    card = model_card(model.config, generation_defaults(model), repo_id="org/sat", provenance=provenance)
    assert ModelCard(str(card)).data.eval_results is None
    assert "model-index:" not in str(card)
    assert "Not evaluated by hfcap yet" in card.text
    assert "| hard | 71.8 |" in card.text


def test_card_describes_the_evaluation_protocol_of_metrics_json(model_dir, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    provenance = resolve_provenance(model_dir, SAT_RELEASED, weights="converted")
    metrics_file = tmp_path / "metrics.json"

    def card_text(summary):
        metrics_file.write_text(json.dumps(summary))
        evaluation = read_metrics(metrics_file)
        return model_card(model.config, generation_defaults(model), repo_id="org/sat", provenance=provenance,
                              evaluation=evaluation).text

    coco = card_text(SUMMARY)
    assert "PTB tokenizer, then BLEU-1..4, METEOR, ROUGE-L and CIDEr-D" in coco and "--cider-only" not in coco
    fast = card_text({**SUMMARY, "protocol": "cider-d-only", "metrics": {"CIDEr-D": 0.91}})
    assert "fast mode (`hfcap evaluate --cider-only`): corpus CIDEr-D only" in fast
    assert "BLEU, METEOR, ROUGE-L and SPICE were not computed" in fast and "PTB tokenizer, then BLEU" not in fast
    unrecorded = card_text(METRICS)  # a flat dict says nothing about its protocol
    assert "does not record how they were computed" in unrecorded and "PTB tokenizer, then BLEU" not in unrecorded
    assert "PTB tokenizer, then BLEU" in model_card(model.config, generation_defaults(model), repo_id="org/sat",
                                                        provenance=provenance).text  # not evaluated: hfcap's protocol

    metrics_file.write_text(json.dumps({**SUMMARY, "protocol": "coco-ish"}))
    with pytest.raises(ValueError, match="unknown protocol 'coco-ish'; expected one of 'coco', 'cider-d-only'"):
        read_metrics(metrics_file)
    metrics_file.write_text(json.dumps({**SUMMARY, "protocol": "cider-d-only"}))
    with pytest.raises(ValueError, match="'cider-d-only' computes CIDEr-D alone, but the file has \\['BLEU-1'"):
        read_metrics(metrics_file)


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_committed_reference_cards_are_current(model_type):
    name = ARCHITECTURES[model_type].cli_name
    assert str(cards.reference_card(model_type)) == (ROOT / f"model_cards/{name}.md").read_text()


def test_card_template_is_package_data():
    """The template ships inside the hfcap package (pyproject's package-data takes its *.md), so installed copies of
    hfcap render cards; only the rendered cards live in the repository's model_cards/."""
    assert cards.TEMPLATE == Path(cards.__file__).parent / "model_card_template.md" and cards.TEMPLATE.is_file()
    expected = sorted(f"{architecture.cli_name}.md" for architecture in ARCHITECTURES.values())
    assert sorted(path.name for path in (ROOT / "model_cards").iterdir()) == expected


def test_read_metrics_accepts_flat_dicts_and_rejects_bad_files(tmp_path):
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"CIDEr-D": 1.2}))
    assert read_metrics(flat) == cards.Evaluation(metrics={"CIDEr-D": 1.2})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"metrics": {"CIDEr": 1.2}}))
    with pytest.raises(ValueError, match="unknown metric keys \\['CIDEr'\\]"):
        read_metrics(bad)
    bad.write_text(json.dumps({"BLEU-4": "high"}))
    with pytest.raises(ValueError, match="must be numbers"):
        read_metrics(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_metrics(tmp_path / "missing.json")


def test_write_provenance_is_what_resolve_provenance_reads(tmp_path):
    path = write_provenance(tmp_path, weights="trained", dataset="Flickr8k", recipe="XE then SCST", source=None)
    assert path == tmp_path / PROVENANCE_FILE
    assert json.loads(path.read_text()) == {"weights": "trained", "dataset": "Flickr8k", "recipe": "XE then SCST"}
    provenance = resolve_provenance(tmp_path, SAT_RELEASED)
    assert (provenance.weights, provenance.dataset, provenance.recipe) == ("trained", "Flickr8k", "XE then SCST")
    write_provenance(tmp_path, weights="converted")  # replaces the file
    assert resolve_provenance(tmp_path, SAT_RELEASED).source.startswith("the tutorial author's released")
    for fields, message in [
        ({"weights": "converted", "origin": "x"}, "unknown provenance fields \\['origin'\\]"),
        ({"dataset": "Flickr8k"}, "weights must be one of converted, trained, got None"),
        ({"weights": "trained"}, "trained weights needs dataset"),
        ({"weights": "trained", "dataset": 8}, "must be strings: dataset=8"),
    ]:
        with pytest.raises(ValueError, match=message):
            write_provenance(tmp_path / "unwritten", **fields)
    assert not (tmp_path / "unwritten").exists()


def test_provenance_file_and_overrides(tmp_path):
    (tmp_path / PROVENANCE_FILE).write_text(json.dumps({"weights": "trained", "dataset": "Flickr8k"}))
    provenance = resolve_provenance(tmp_path, SAT_RELEASED, recipe="SCST")
    assert (provenance.weights, provenance.dataset, provenance.recipe) == ("trained", "Flickr8k", "SCST")
    converted = resolve_provenance(tmp_path, SAT_RELEASED, weights="converted", dataset=None)
    assert converted.source.startswith("the tutorial author's released checkpoint")
    assert converted.dataset == "Flickr8k"  # the file's value still overrides the architecture default
    (tmp_path / PROVENANCE_FILE).write_text(json.dumps({"weights": "trained"}))
    with pytest.raises(ValueError, match="needs --dataset"):
        resolve_provenance(tmp_path, SAT_RELEASED)
    (tmp_path / PROVENANCE_FILE).write_text(json.dumps({"weights": "trained", "origin": "x"}))
    with pytest.raises(ValueError, match="unknown keys \\['origin'\\]"):
        resolve_provenance(tmp_path, SAT_RELEASED)


# --- hfcap push: bad inputs fail before anything is uploaded ---------------------------------------------------------


def test_push_rejects_directories_that_are_not_hfcap_models(model_dir, tmp_path, capsys):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    no_processor = tmp_path / "no_processor"
    no_processor.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (no_processor / name).write_bytes((model_dir / name).read_bytes())
    cases = [
        (tmp_path / "absent", 3, "model directory not found"),
        (tmp_path, 2, "has no config.json"),
        (bert, 2, "holds a 'bert' model, not an hfcap model"),
        (no_processor, 2, "has no loadable CaptioningProcessor"),
    ]
    for directory, code, message in cases:
        assert hfcap_cli(["push", str(directory), "--repo-id", "org/x", *TRAINED]) == code
        assert message in capsys.readouterr().err
    assert hfcap_cli(["push", str(model_dir), "--repo-id", "org/x"]) == 2
    assert "--weights converted" in capsys.readouterr().err
    assert hfcap_cli(["push", str(model_dir), "--repo-id", "org/x", "--metrics", str(tmp_path / "m.json"),
                      *TRAINED]) == 3
    assert "metrics file not found" in capsys.readouterr().err
