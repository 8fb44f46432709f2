"""ExpansionNet v2 converter: the authors' checkpoints and tokens pickles, overrides, refusals, full-size key map."""

import argparse
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hfcap.conversion import expansionnet_v2
from hfcap.conversion.expansionnet_v2 import (
    OVERRIDES,
    add_arguments,
    check_shapes,
    convert,
    infer_config,
    map_key,
    read_vocabulary,
)
from hfcap.conversion.safe_unpickle import CheckpointError, CorruptCheckpointError, UnsafePickleError
from hfcap.generation import reference_beam_search
from hfcap.models.expansionnet_v2 import ExpansionNetV2ForConditionalGeneration
from hfcap.processing import CaptioningProcessor, tokenizer_from_vocabulary

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
FIXTURES = SHARED / "reference" / "expansionnet_v2"
P1 = FIXTURES / "p1_swin16_img96_w3_5grp"
P2 = FIXTURES / "p2_swin20_img128_w4_3grp"
RELEASED_VOCABULARY = SHARED / "real" / "expansionnet_v2_demo_coco_tokens.pickle"
P1_OVERRIDES = {"num_heads": 4, "static_expansion_groups": [2, 4, 8, 16, 32]}


pytestmark = pytest.mark.usefixtures("one_thread")


def write_checkpoint(path, model_state_dict):
    """A checkpoint in the authors' `save_last_checkpoint` layout."""
    torch.save(
        {
            "model_state_dict": model_state_dict,
            "optimizer_state_dict": {"state": {}, "param_groups": []},
            "scheduler_state_dict": {"last_epoch": 0},
            "data_loader_state_dict": {"batch_it": 0, "epoch_it": 0, "batch_size": 4, "array_of_init_seed": [0.5]},
        },
        path,
    )
    return path


def test_full_size_key_map_is_complete_on_the_meta_device():
    """Every one of the released model's 520 keys maps onto a full-size hfcap model built from the config the
    converter infers: parameters with their shapes, the 35 Swin buffers dropped."""
    listing = json.loads((FIXTURES / "full_size_keys.json").read_text())
    entries = listing["entries"]
    assert len(entries) == 520
    shapes = {entry["key"]: tuple(entry["shape"]) for entry in entries}
    config, image_size = infer_config(shapes)
    assert image_size == 384
    assert config.backbone_kwargs is None  # exactly timm's swin_large_patch4_window12_384
    assert (config.d_model, config.d_ff, config.num_encoder_layers, config.num_decoder_layers) == (512, 2048, 3, 3)
    assert (config.vocab_size, config.max_position_embeddings, config.visual_feature_dim) == (10000, 74, 1536)
    assert (list(config.static_expansion_groups), config.num_dynamic_expansions) == ([32, 64, 128, 256, 512], 16)
    with torch.device("meta"):
        model = ExpansionNetV2ForConditionalGeneration(config)
    model_shapes = {key: tensor.shape for key, tensor in model.state_dict().items()}
    mapped = {map_key(key): shape for key, shape in shapes.items() if map_key(key) is not None}
    dropped = sorted(key for key in shapes if map_key(key) is None)
    assert dropped == sorted(entry["key"] for entry in entries if entry["kind"] == "buffer")
    assert len(mapped) == listing["num_parameter_entries"] == len(model_shapes)
    check_shapes(mapped, model_shapes)
    assert sum(tensor.numel() for tensor in model.parameters()) == listing["num_parameters"]
    assert sum(tensor.numel() for tensor in model.backbone.parameters()) == listing["num_swin_parameters"]
    # timm keeps the patch merging at the start of the next stage.
    merging = map_key("swin_transf.layers.2.downsample.reduction.weight")
    assert merging == "encoder.backbone.layers.3.downsample.reduction.weight"


def test_released_vocabulary_becomes_a_tokenizer_with_their_ids():
    tokens, special_tokens = read_vocabulary(RELEASED_VOCABULARY)
    assert len(tokens) == 10000
    assert tokens[:2] == ["\n", '"']
    tokenizer = tokenizer_from_vocabulary(tokens, **special_tokens)
    assert len(tokenizer) == 10000
    assert tokenizer.convert_ids_to_tokens(list(range(10000))) == tokens
    ids = (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id)
    assert ids == (77, 78, 79, 80)
    assert tokenizer.decode(tokenizer("a man riding a horse", add_special_tokens=False)["input_ids"]) == (
        "a man riding a horse"
    )


def test_overrides_reach_config_generation_config_and_processor(tmp_path):
    output = convert(
        P1 / "checkpoint.pth",
        P1 / "tokens.pickle",
        tmp_path,
        **P1_OVERRIDES,
        dropout_enc=0.3,
        dropout_other=0.1,
        expansion_eps=1e-4,
        num_beams=3,
        max_new_tokens=10,
    )
    model = ExpansionNetV2ForConditionalGeneration.from_pretrained(output)
    assert (model.config.dropout_enc, model.config.dropout_other, model.config.expansion_eps) == (0.3, 0.1, 1e-4)
    assert (model.config.dropout_dec, model.config.dropout_enc_input, model.config.dropout_dec_input) == (0, 0, 0)
    assert (model.generation_config.num_beams, model.generation_config.max_new_tokens) == (3, 10)
    processor = CaptioningProcessor.from_pretrained(output)
    assert processor.image_processor.size == {"height": 96, "width": 96}  # read from Swin's shift masks
    assert processor.image_processor.resample == 2  # PIL bilinear, as torchvision's Resize on a PIL image
    assert processor.max_caption_length == 23


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_heads": 5, "static_expansion_groups": [2, 4, 8, 16, 32]}, "num_heads=5 does not divide"),
        ({"num_heads": 4}, r"static_expansion_groups=\[32, 64, 128, 256, 512\] sums to 992.*62 rows"),
        ({**P1_OVERRIDES, "image_size": 128}, r"image_size=128 contradicts .* 96x96"),
    ],
)
def test_overrides_that_contradict_the_checkpoint_are_errors(tmp_path, overrides, message):
    with pytest.raises(CheckpointError, match=message):
        convert(P1 / "checkpoint.pth", P1 / "tokens.pickle", tmp_path, **overrides)


def test_settings_out_of_range_are_errors(tmp_path):
    with pytest.raises(ValueError, match=r"`dropout_enc` must lie in \[0, 1\]"):
        convert(P1 / "checkpoint.pth", P1 / "tokens.pickle", tmp_path, **P1_OVERRIDES, dropout_enc=1.5)


def test_any_grouping_of_the_static_expansion_rows_is_taken():
    """Only the sum of the groups is in the shapes; the grouping is the override's."""
    shapes = {key: tuple(tensor.shape) for key, tensor in torch.load(
        P1 / "checkpoint.pth", map_location="cpu", weights_only=True)["model_state_dict"].items()}
    config, _ = infer_config(shapes, num_heads=4, static_expansion_groups=[30, 32])
    assert list(config.static_expansion_groups) == [30, 32]


def test_cli_flags_are_the_overrides():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert vars(parser.parse_args([])) == {}
    arguments = vars(
        parser.parse_args(
            "--num-heads 4 --static-expansion-groups 2 4 8 --expansion-eps 1e-4 --dropout-enc 0.3 --dropout-dec 0.3 "
            "--dropout-enc-input 0.3 --dropout-dec-input 0.3 --dropout-other 0.3 --image-size 96 --num-beams 3 "
            "--max-new-tokens 20".split()
        )
    )
    assert set(arguments) == set(OVERRIDES)
    assert arguments["static_expansion_groups"] == [2, 4, 8] and arguments["dropout_dec_input"] == 0.3


def test_body_only_checkpoint_gives_a_features_only_model(tmp_path):
    """Their partial-training `ExpansionNet_v2` (no `swin_transf.` keys) converts to `use_backbone=False`; fed the
    case's Swin tokens it reproduces their encoder output and beam search."""
    state = torch.load(P1 / "checkpoint.pth", map_location="cpu", weights_only=True)["model_state_dict"]
    body = {key: tensor for key, tensor in state.items() if not key.startswith("swin_transf.")}
    checkpoint = write_checkpoint(tmp_path / "body.pth", body)
    output = convert(checkpoint, P1 / "tokens.pickle", tmp_path / "model", **P1_OVERRIDES)
    model = ExpansionNetV2ForConditionalGeneration.from_pretrained(output).eval()
    assert not model.config.use_backbone and model.backbone is None
    expected = load_file(P1 / "expected.safetensors")
    features = expected["swin_output"]
    encoded = model.get_encoder()(visual_features=features).last_hidden_state
    torch.testing.assert_close(encoded, expected["encoder_output"], atol=1e-5, rtol=0)
    sequences = model.generate(visual_features=features, num_beams=3, custom_generate=reference_beam_search)
    for image in range(features.shape[0]):
        length = int(expected["beam3_lengths"][image, 0])
        assert sequences[image, :length].tolist() == expected["beam3_tokens"][image, 0, :length].tolist()


def test_another_architectures_checkpoint_is_refused():
    sat = SHARED / "reference" / "sat" / "small" / "checkpoint.pth.tar"
    with pytest.raises(CheckpointError, match="not an ExpansionNet v2 checkpoint"):
        convert(sat, P1 / "tokens.pickle", "/nonexistent-output")


def test_state_dict_of_another_model_is_refused(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "other.pth", {"encoder.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="not an ExpansionNet v2 checkpoint.*lacks input_linear.weight"):
        convert(checkpoint, P1 / "tokens.pickle", tmp_path / "out")


def test_truncated_checkpoint_is_refused(tmp_path):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((P1 / "checkpoint.pth").read_bytes()[:100_000])
    with pytest.raises(CorruptCheckpointError, match="truncated or corrupt"):
        convert(truncated, P1 / "tokens.pickle", tmp_path / "out")


class Payload:
    """Unpickling this calls os.system: a malicious 'checkpoint'."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("kind", ["checkpoint", "vocab"])
def test_malicious_pickles_are_refused_without_running_anything(tmp_path, kind):
    marker = tmp_path / "pwned"
    malicious = tmp_path / "malicious.pth"
    if kind == "checkpoint":
        torch.save({"model_state_dict": Payload(marker)}, malicious)
        files = (malicious, P1 / "tokens.pickle")
    else:
        import pickle

        malicious.write_bytes(pickle.dumps({"word2idx_dict": Payload(marker)}))
        files = (P1 / "checkpoint.pth", malicious)
    with pytest.raises(UnsafePickleError, match="system"):
        convert(*files, tmp_path / "out", **P1_OVERRIDES)
    assert not marker.exists()


def test_vocabulary_of_another_checkpoint_is_refused(tmp_path):
    with pytest.raises(ValueError, match="vocabulary has 50 words but the checkpoint's vocab_linear has 60 rows"):
        convert(P1 / "checkpoint.pth", P2 / "tokens.pickle", tmp_path, **P1_OVERRIDES)


def test_unknown_setting_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown ExpansionNet v2 conversion settings"):
        convert(P1 / "checkpoint.pth", P1 / "tokens.pickle", tmp_path, d_model=48)


def test_allowlists_are_the_converters_own():
    assert expansionnet_v2.EXPANSIONNET_V2_CHECKPOINT.kind == "ExpansionNet v2 checkpoint"
    allowed = expansionnet_v2.EXPANSIONNET_V2_CHECKPOINT.globals
    assert not any(name.startswith(("models.", "os.", "posix.")) for name in allowed)
