"""Show-Attend-Tell converter: the authors' tutorial checkpoints become hfcap models that reproduce the reference."""

import importlib
import json
import os
import sys
import uuid
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hfcap.cards import converted_provenance, model_card
from hfcap.cli import main
from hfcap.conversion import convert_checkpoint
from hfcap.conversion.safe_unpickle import CheckpointError, CorruptCheckpointError, UnsafePickleError
from hfcap.conversion.show_attend_tell import RESNET_CHILDREN, map_encoder_state_dict, read_checkpoint
from hfcap.models.show_attend_tell import ShowAttendTellConfig, ShowAttendTellForConditionalGeneration
from hfcap.models.show_attend_tell.modeling_show_attend_tell import ShowAttendTellEncoder
from hfcap.loading import load_captioner
from hfcap.processing import CaptioningProcessor
from hfcap.provenance import resolve_provenance

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "reference"
SAT = REFERENCE / "sat"

# Structure-only stand-ins for the tutorial's models.py classes (constructors as in models.py, no forward), so tests
# can write checkpoints exactly as utils.save_checkpoint does: whole modules pickled as `models.<Class>`.
TUTORIAL_MODELS_PY = '''
from torch import nn


class Encoder(nn.Module):
    def __init__(self, resnet, encoded_image_size=14):
        super().__init__()
        self.enc_image_size = encoded_image_size
        self.resnet = nn.Sequential(*list(resnet.children())[:-2])
        self.adaptive_pool = nn.AdaptiveAvgPool2d((encoded_image_size, encoded_image_size))


class Attention(nn.Module):
    def __init__(self, encoder_dim, decoder_dim, attention_dim):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)
        self.relu = nn.ReLU()
        self.softmax = nn.Softmax(dim=1)


class DecoderWithAttention(nn.Module):
    def __init__(self, attention_dim, embed_dim, decoder_dim, vocab_size, encoder_dim=2048, dropout=0.5):
        super().__init__()
        self.encoder_dim, self.attention_dim, self.embed_dim = encoder_dim, attention_dim, embed_dim
        self.decoder_dim, self.vocab_size, self.dropout = decoder_dim, vocab_size, dropout
        self.attention = Attention(encoder_dim, decoder_dim, attention_dim)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.dropout = nn.Dropout(p=self.dropout)
        self.decode_step = nn.LSTMCell(embed_dim + encoder_dim, decoder_dim, bias=True)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)
        self.init_c = nn.Linear(encoder_dim, decoder_dim)
        self.f_beta = nn.Linear(decoder_dim, encoder_dim)
        self.sigmoid = nn.Sigmoid()
        self.fc = nn.Linear(decoder_dim, vocab_size)
'''


@pytest.fixture
def tutorial_models(tmp_path, monkeypatch):
    """The stand-in ``models`` module, importable under that top-level name for the duration of a test."""
    (tmp_path / "models.py").write_text(TUTORIAL_MODELS_PY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "models", raising=False)
    yield importlib.import_module("models")
    sys.modules.pop("models", None)


def save_tutorial_checkpoint(path, decoder, encoder=None, legacy=False):
    """``utils.save_checkpoint``'s dict, with a real Adam over the decoder as the tutorial pickles it."""
    state = {
        "epoch": 7,
        "epochs_since_improvement": 0,
        "bleu-4": 0.25,
        "encoder": encoder,
        "decoder": decoder,
        "encoder_optimizer": None,
        "decoder_optimizer": torch.optim.Adam(decoder.parameters(), lr=4e-4),
    }
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)


def assert_reproduces_reference(model, case_dir):
    """Teacher-forced logits vs the original's, in float32 (atol 5e-5) and float64 (1e-8), in its sorted order."""
    inputs = load_file(case_dir / "inputs.safetensors")
    for file, dtype, atol, rtol in (("expected.safetensors", torch.float32, 5e-5, 1e-5),
                                    ("expected_fp64.safetensors", torch.float64, 1e-8, 0.0)):
        expected = load_file(case_dir / file)
        order, lengths = expected["sort_ind"], expected["decode_lengths"]
        features = inputs["encoder_out"][order].flatten(1, 2).to(dtype)  # (B, 196, D), the tutorial's view(B, -1, D)
        input_ids = inputs["encoded_captions"][order, : int(lengths.max())]
        with torch.no_grad():
            logits = model.to(dtype)(visual_features=features, decoder_input_ids=input_ids).logits
        assert logits.dtype == dtype
        for row, length in enumerate(lengths.tolist()):
            torch.testing.assert_close(
                logits[row, :length], expected["predictions"][row, :length], atol=atol, rtol=rtol
            )


@pytest.fixture(scope="module", params=["small", "small-b"])
def converted(request, tmp_path_factory):
    case_dir = SAT / request.param
    output = convert_checkpoint(
        "show-attend-tell", case_dir / "checkpoint.pth.tar", case_dir / "WORDMAP.json",
        tmp_path_factory.mktemp(request.param),
    )
    return case_dir, output


def test_converted_fixture_reproduces_the_reference(converted):
    case_dir, output = converted
    case = json.loads((case_dir / "case.json").read_text())
    model = ShowAttendTellForConditionalGeneration.from_pretrained(output).eval()

    constructor = case["constructor"]["DecoderWithAttention"]
    ours = {"decoder_dim": "d_model", "encoder_dim": "visual_feature_dim"}  # hfcap's shared config names
    for name in ("vocab_size", "embed_dim", "attention_dim", "decoder_dim", "encoder_dim", "dropout"):
        assert getattr(model.config, ours.get(name, name)) == constructor[name], name
    assert model.config.use_backbone is False  # the fixture checkpoints hold no encoder: features only

    reference = torch.load(case_dir / "decoder_state_dict.pth", weights_only=True)
    state = model.state_dict()
    assert sorted(state) == sorted(f"decoder.{key}" for key in reference)
    for key, tensor in reference.items():
        assert torch.equal(state[f"decoder.{key}"], tensor), key

    assert_reproduces_reference(model, case_dir)


def test_converted_processor_keeps_the_word_map(converted):
    case_dir, output = converted
    word_map = json.loads((case_dir / "WORDMAP.json").read_text())
    processor = CaptioningProcessor.from_pretrained(output)
    tokenizer = processor.tokenizer
    assert tokenizer.get_vocab() == word_map
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (
        "<pad>", "<start>", "<end>", "<unk>",
    )
    words = [word for word in word_map if not word.startswith("<")][:5]
    assert tokenizer(" ".join(words), add_special_tokens=False).input_ids == [word_map[word] for word in words]

    config = ShowAttendTellConfig.from_pretrained(output)
    assert (config.pad_token_id, config.bos_token_id, config.decoder_start_token_id, config.eos_token_id) == (
        word_map["<pad>"], word_map["<start>"], word_map["<start>"], word_map["<end>"],
    )
    image_processor = processor.image_processor
    assert image_processor.size == {"height": 256, "width": 256} and image_processor.resample == 2  # PIL bilinear
    generation = json.loads((output / "generation_config.json").read_text())
    assert generation["num_beams"] == 5 and generation["max_new_tokens"] == 51  # caption.py's defaults


def test_full_structure_encoder_maps_onto_timm_resnet101():
    checkpoint = read_checkpoint(SAT / "small-b" / "checkpoint_full_structure.pth.tar")
    entries = json.loads((SAT / "small-b" / "encoder_keys.json").read_text())["entries"]
    backbone_state = ShowAttendTellEncoder(ShowAttendTellConfig()).backbone.state_dict()  # the model's resnet101

    mapped = map_encoder_state_dict(checkpoint.encoder_state, backbone_state)

    assert len(entries) == len(checkpoint.encoder_state) == len(mapped) == len(backbone_state) == 624
    assert set(mapped) == set(backbone_state)  # none unmapped, none of timm's left unfilled
    for entry in entries:
        _, child, rest = entry["key"].split(".", 2)
        tensor = mapped[f"{RESNET_CHILDREN[child]}.{rest}"]
        assert list(tensor.shape) == entry["shape"] and torch.all(tensor == entry["tag"]), entry["key"]


def test_full_structure_checkpoint_with_mismatched_decoder_is_refused(tmp_path):
    # its decoder was built with encoder_dim=128, which no ResNet-101 trunk can feed
    with pytest.raises(CheckpointError, match="does not fit a resnet101 backbone.*128"):
        convert_checkpoint(
            "show-attend-tell", SAT / "small-b" / "checkpoint_full_structure.pth.tar",
            SAT / "small-b" / "WORDMAP.json", tmp_path,
        )


def test_legacy_container_checkpoint_converts(tmp_path, tutorial_models):
    case_dir = SAT / "small-b"
    decoder = tutorial_models.DecoderWithAttention(32, 32, 64, 43, encoder_dim=128).eval()
    decoder.load_state_dict(torch.load(case_dir / "decoder_state_dict.pth", weights_only=True))
    checkpoint = tmp_path / "BEST_checkpoint.pth.tar"
    save_tutorial_checkpoint(checkpoint, decoder, legacy=True)
    assert checkpoint.read_bytes()[:2] != b"PK"  # not the zip container

    output = convert_checkpoint("show_attend_tell", checkpoint, case_dir / "WORDMAP.json", tmp_path / "out")
    assert_reproduces_reference(ShowAttendTellForConditionalGeneration.from_pretrained(output).eval(), case_dir)


def _tag_tensors(module):
    """Replace every parameter and buffer by a stride-0 view of its 1-based position (as the fixture's tags)."""
    tags = {}
    for prefix, submodule in module.named_modules():
        for tensors in (submodule._parameters, submodule._buffers):
            for name, tensor in tensors.items():
                if tensor is None:  # e.g. the bias of a bias-free conv
                    continue
                tags[f"{prefix}.{name}"] = len(tags) + 1
                view = torch.full((1,) * tensor.dim(), len(tags), dtype=tensor.dtype).expand_as(tensor)
                is_parameter = tensors is submodule._parameters
                tensors[name] = torch.nn.Parameter(view, requires_grad=False) if is_parameter else view
    return tags


def test_checkpoint_with_encoder_converts_to_a_pixel_model(tmp_path, tutorial_models):
    import torchvision

    encoder = tutorial_models.Encoder(torchvision.models.resnet50(weights=None)).eval()
    tags = _tag_tensors(encoder)
    decoder = tutorial_models.DecoderWithAttention(8, 8, 16, 43, encoder_dim=2048, dropout=0.3)
    checkpoint = tmp_path / "checkpoint.pth.tar"
    save_tutorial_checkpoint(checkpoint, decoder, encoder)

    output = convert_checkpoint(
        "show-attend-tell", checkpoint, SAT / "small-b" / "WORDMAP.json", tmp_path / "out",
        backbone="resnet50", image_size=64, num_beams=3,
    )

    model = ShowAttendTellForConditionalGeneration.from_pretrained(output).eval()
    assert model.config.use_backbone and model.config.backbone == "resnet50" and model.config.dropout == 0.3
    assert model.generation_config.num_beams == 3
    backbone_state = model.encoder.backbone.state_dict()
    assert len(backbone_state) == len(tags)
    for key, tag in tags.items():
        _, child, rest = key.split(".", 2)
        assert torch.all(backbone_state[f"{RESNET_CHILDREN[child]}.{rest}"] == tag), key
    for key, tensor in decoder.state_dict().items():
        assert torch.equal(model.state_dict()[f"decoder.{key}"], tensor), key

    processor = CaptioningProcessor.from_pretrained(output)
    pixel_values = processor(images=Image.new("RGB", (50, 40)))["pixel_values"]
    assert pixel_values.shape == (1, 3, 64, 64)
    with torch.no_grad():
        logits = model(pixel_values=pixel_values, decoder_input_ids=torch.tensor([[41, 1]])).logits
    assert logits.shape == (1, 2, 43)


def test_code_executing_checkpoint_is_refused(tmp_path):
    side_effect = Path(f"/tmp/pwned_{uuid.uuid4().hex}")

    class RunsShellCommand:
        def __reduce__(self):
            return os.system, (f"touch {side_effect}",)

    checkpoint = tmp_path / "checkpoint.pth.tar"
    torch.save({"decoder": RunsShellCommand()}, checkpoint)
    with pytest.raises(UnsafePickleError, match=r"refusing to load posix\.system: not an allowed class in a "
                                                 r"Show-Attend-Tell checkpoint"):
        convert_checkpoint("show-attend-tell", checkpoint, SAT / "small" / "WORDMAP.json", tmp_path / "out")
    assert not side_effect.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "checkpoint, problem",
    [
        (SAT / "small" / "decoder_state_dict.pth", "the checkpoint dict lacks bleu-4, decoder"),
        (REFERENCE / "m2" / "small" / "checkpoint.pth", "the checkpoint dict lacks bleu-4, decoder"),
    ],
    ids=["plain-state-dict", "m2-checkpoint"],
)
def test_other_checkpoints_are_not_show_attend_tell(tmp_path, checkpoint, problem):
    with pytest.raises(CheckpointError, match=f"not a Show-Attend-Tell checkpoint: .*{problem}"):
        convert_checkpoint("show-attend-tell", checkpoint, SAT / "small" / "WORDMAP.json", tmp_path)


def test_checkpoint_whose_decoder_is_not_the_tutorials(tmp_path):
    checkpoint = tmp_path / "checkpoint.pth.tar"
    save_tutorial_checkpoint(checkpoint, torch.nn.Linear(2, 2))
    problem = "'decoder' is torch.nn.modules.linear.Linear, not a pickled models.DecoderWithAttention"
    with pytest.raises(CheckpointError, match=f"not a Show-Attend-Tell checkpoint: .*{problem}"):
        convert_checkpoint("show-attend-tell", checkpoint, SAT / "small" / "WORDMAP.json", tmp_path / "out")


def test_truncated_checkpoint(tmp_path):
    data = (SAT / "small" / "checkpoint.pth.tar").read_bytes()
    truncated = tmp_path / "checkpoint.pth.tar"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match=f"checkpoint file is truncated or corrupt: {truncated}"):
        convert_checkpoint("show-attend-tell", truncated, SAT / "small" / "WORDMAP.json", tmp_path / "out")


def test_vocabulary_of_another_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="vocabulary has 54 words but the checkpoint's embedding has 43 rows"):
        convert_checkpoint(
            "show-attend-tell", SAT / "small-b" / "checkpoint.pth.tar", SAT / "small" / "WORDMAP.json", tmp_path
        )


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "not a WORDMAP json"),
        ('["a", "b"]', "not a WORDMAP json"),
        ('{"<pad>": 0, "a": 2, "<unk>": 3, "<start>": 4, "<end>": 5}', r"not exactly 0\.\.4"),
        ('{"<pad>": 0, "a": 1, "<unk>": 2, "<end>": 3}', "lacks the tutorial's special tokens <start>"),
    ],
)
def test_malformed_word_maps(tmp_path, content, problem):
    vocab = tmp_path / "WORDMAP.json"
    vocab.write_text(content)
    with pytest.raises(ValueError, match=problem):
        convert_checkpoint("show-attend-tell", SAT / "small" / "checkpoint.pth.tar", vocab, tmp_path / "out")


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint file not found: .*nope.pth.tar"):
        convert_checkpoint("show-attend-tell", tmp_path / "nope.pth.tar", SAT / "small" / "WORDMAP.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="vocabulary file not found: .*nope.json"):
        convert_checkpoint("show-attend-tell", SAT / "small" / "checkpoint.pth.tar", tmp_path / "nope.json", tmp_path)


def test_unknown_architecture(tmp_path):
    case_dir = SAT / "small"
    with pytest.raises(ValueError, match="unknown architecture 'show-and-tell'; hfcap has: show-attend-tell"):
        convert_checkpoint("show-and-tell", case_dir / "checkpoint.pth.tar", case_dir / "WORDMAP.json", tmp_path)


def _convert_cli(argv):
    return main(["convert", *argv])


def test_cli_converts_and_reports_errors(tmp_path, capsys):
    case_dir = SAT / "small-b"
    output = tmp_path / "converted"
    code = _convert_cli(["show-attend-tell", "--checkpoint", str(case_dir / "checkpoint.pth.tar"),
                         "--vocab", str(case_dir / "WORDMAP.json"), "--output", str(output), "--image-size", "224"])
    assert code == 0 and f"-> {output}" in capsys.readouterr().out
    assert CaptioningProcessor.from_pretrained(output).image_processor.size == {"height": 224, "width": 224}

    code = _convert_cli(["show-attend-tell", "--checkpoint", str(tmp_path / "missing.pth.tar"),
                         "--vocab", str(case_dir / "WORDMAP.json"), "--output", str(tmp_path / "x")])
    assert code == 3  # the exit status of a missing input file, in every subcommand
    error = capsys.readouterr().err
    assert error.startswith("hfcap convert: error: checkpoint file not found:") and error.count("\n") == 1

    for flag, value in (("--image-size", "0"), ("--num-beams", "-2")):
        code = _convert_cli(["show-attend-tell", "--checkpoint", str(case_dir / "checkpoint.pth.tar"),
                             "--vocab", str(case_dir / "WORDMAP.json"), "--output", str(tmp_path / "y"), flag, value])
        assert code == 2 and "must be an integer in" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()  # refused before anything is written


def test_converted_directory_records_its_provenance_for_the_model_card(tmp_path):
    """`hfcap convert` writes hfcap_provenance.json, so `hfcap push DIR` needs no --weights flag and its model card
    says that the weights were converted, and from which files."""
    case_dir = SAT / "small-b"
    output = tmp_path / "converted"
    assert _convert_cli(["show-attend-tell", "--checkpoint", str(case_dir / "checkpoint.pth.tar"),
                         "--vocab", str(case_dir / "WORDMAP.json"), "--output", str(output)]) == 0
    source = "the show-attend-tell checkpoint `checkpoint.pth.tar` and its vocabulary `WORDMAP.json`"
    assert json.loads((output / "hfcap_provenance.json").read_text()) == {"weights": "converted", "source": source}

    model, _ = load_captioner(output)  # what `hfcap push` renders its card from, without the upload
    provenance = resolve_provenance(output, converted_provenance(model.config.model_type))  # no CLI overrides
    card = model_card(model.config, {"num_beams": 5}, repo_id="org/sat", provenance=provenance)
    assert f"- **Weights:** converted from {source}.\n" in card.text
    assert f"Converted from {source} with `hfcap convert show-attend-tell`." in card.text
    assert card.data.license == "mit" and card.data.datasets == ["yerevann/coco-karpathy"]  # the authors' facts


def test_nan_weights_are_refused_before_anything_is_written(tmp_path, tutorial_models):
    decoder = tutorial_models.DecoderWithAttention(32, 32, 64, 43, encoder_dim=128)
    with torch.no_grad():
        decoder.fc.weight[3, 5] = float("nan")
    checkpoint = tmp_path / "checkpoint.pth.tar"
    save_tutorial_checkpoint(checkpoint, decoder, None)
    with pytest.raises(CheckpointError, match="NaN or infinite weights in 1 tensors, e.g. decoder.fc.weight"):
        convert_checkpoint("show-attend-tell", checkpoint, SAT / "small-b" / "WORDMAP.json", tmp_path / "out")
    assert not (tmp_path / "out").exists()
