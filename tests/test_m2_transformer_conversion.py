"""The M² converter (`hfcap.conversion.m2_transformer`): the authors' train.py checkpoint and pickled vocabulary in,
a `save_pretrained` directory out; shapes give the sizes, overrides the rest; wrong, damaged or malicious files are
refused with clear errors. Numerical parity of converted fixtures is in test_m2_transformer_parity.py."""

import argparse
import json
import os
import pickle
import uuid
from pathlib import Path

import pytest
import torch

from hfcap.conversion.m2_transformer import (
    CHECKPOINT_ALLOWLIST,
    OVERRIDES,
    SPECIAL_TOKENS,
    add_arguments,
    convert,
    read_vocabulary,
)
from hfcap.conversion.safe_unpickle import CheckpointError, CorruptCheckpointError, UnsafePickleError, load_checkpoint
from hfcap.models.m2_transformer import M2TransformerConfig, M2TransformerForConditionalGeneration
from hfcap.processing import CaptioningProcessor, tokenizer_from_vocabulary

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
M2 = FIXTURES / "reference" / "m2"
SMALL = M2 / "small"
SAT = FIXTURES / "reference" / "sat"
RELEASED_VOCABULARY = FIXTURES / "real" / "m2_vocab.pkl"


class RunsShellCommand:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    output = tmp_path_factory.mktemp("small")
    assert convert(SMALL / "checkpoint.pth", SMALL / "vocab.pkl", output, num_heads=4) == output
    return output


def test_released_vocabulary_converts_with_the_authors_ids():
    """The authors' released vocab.pkl: 10,201 tokens, specials <unk>=0 <pad>=1 <bos>=2 <eos>=3, itos order kept."""
    tokens = read_vocabulary(RELEASED_VOCABULARY)
    tokenizer = tokenizer_from_vocabulary(tokens, **SPECIAL_TOKENS)  # as `convert` builds it
    assert len(tokens) == len(tokenizer) == len(tokenizer.get_vocab()) == 10201
    assert (tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert tokenizer.convert_ids_to_tokens(list(range(len(tokens)))) == tokens
    assert tokens[4:8] == ["a", "on", "of", "the"]  # by frequency
    words = tokenizer("A man riding a horse.", add_special_tokens=False).input_ids
    assert tokenizer.decode(words) == "a man riding a horse"


def test_converted_directory(converted):
    spec = json.loads((SMALL / "case.json").read_text())
    model = M2TransformerForConditionalGeneration.from_pretrained(converted)
    config = model.config
    assert (config.d_model, config.num_heads, config.head_dim, config.d_ff) == (64, 4, 16, 256)
    assert (config.num_memory_slots, config.visual_feature_dim, config.vocab_size) == (8, 128, 54)
    assert (config.num_encoder_layers, config.num_decoder_layers, config.max_position_embeddings) == (3, 3, 54)
    # the authors' input behaviour, features only
    assert (config.use_backbone, config.mask_padded_regions, config.pad_regions_to) == (False, False, 50)
    assert config.position_embedding_type == "frozen_random" and model.backbone is None
    special_ids = (config.pad_token_id, config.bos_token_id, config.decoder_start_token_id, config.eos_token_id)
    assert special_ids == (1, 2, 2, 3)
    assert (model.generation_config.num_beams, model.generation_config.max_new_tokens) == (5, 20)

    state = load_checkpoint(SMALL / "checkpoint.pth", CHECKPOINT_ALLOWLIST)["state_dict"]
    converted_state = model.state_dict()
    assert torch.equal(converted_state["decoder.position_table"], state["decoder.pos_emb.weight"])  # copied as is
    gate = converted_state["decoder.layers.2.fc_alpha.0.weight"]
    assert torch.equal(gate, state["decoder.layers.2.fc_alpha1.weight"])
    assert not any("running_" in key for key in converted_state)
    assert len(converted_state) == spec["checkpoint"]["state_dict_entries"] - 8  # the 8 running_* buffers dropped

    processor = CaptioningProcessor.from_pretrained(converted)
    assert processor.tokenizer.convert_ids_to_tokens(list(range(54))) == spec["vocab"]["itos"]
    assert processor.max_caption_length == 53
    assert processor.image_processor.size == {"height": 224, "width": 224}


def test_overrides(tmp_path):
    output = convert(
        SMALL / "checkpoint.pth", SMALL / "vocab.pkl", tmp_path, head_dim=16, dropout=0.2, num_beams=3,
        max_new_tokens=12, image_size=64,
    )
    config = M2TransformerConfig.from_pretrained(output)
    assert (config.num_heads, config.head_dim, config.dropout) == (4, 16, 0.2)  # 4 heads = 64 / head_dim
    model = M2TransformerForConditionalGeneration.from_pretrained(output)
    assert (model.generation_config.num_beams, model.generation_config.max_new_tokens) == (3, 12)
    assert CaptioningProcessor.from_pretrained(output).image_processor.size == {"height": 64, "width": 64}


def test_default_heads_are_the_authors_eight(tmp_path):
    """train.py never passes --head on: without overrides the converter assumes 8 heads (64 = 8 x 8 here)."""
    config = M2TransformerConfig.from_pretrained(convert(SMALL / "checkpoint.pth", SMALL / "vocab.pkl", tmp_path))
    assert (config.num_heads, config.head_dim) == (8, 8)


@pytest.mark.parametrize(
    "overrides, problem",
    [
        ({"num_heads": 3}, "h \\* d_k = 64 wide, which num_heads=3 and head_dim=\\? do not give"),
        ({"head_dim": 24}, "h \\* d_k = 64 wide, which num_heads=\\? and head_dim=24 do not give"),
        ({"num_heads": 4, "head_dim": 8}, "h \\* d_k = 64 wide, which num_heads=4 and head_dim=8 do not give"),
    ],
    ids=["heads-do-not-divide", "head-dim-does-not-divide", "product-differs"],
)
def test_override_contradicting_the_shapes_is_an_error(tmp_path, overrides, problem):
    with pytest.raises(CheckpointError, match=problem):
        convert(SMALL / "checkpoint.pth", SMALL / "vocab.pkl", tmp_path / "out", **overrides)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "overrides, problem",
    [({"dropout": 1.5}, "dropout"), ({"num_beams": 0}, "`num_beams` must be a positive integer")],
    ids=["dropout", "num-beams"],
)
def test_invalid_settings_are_value_errors(tmp_path, overrides, problem):
    with pytest.raises(ValueError, match=problem):
        convert(SMALL / "checkpoint.pth", SMALL / "vocab.pkl", tmp_path / "out", num_heads=4, **overrides)


def test_show_attend_tell_checkpoints_are_refused(tmp_path):
    with pytest.raises(UnsafePickleError, match="refusing to load models.DecoderWithAttention.*another "
                                                "architecture.s checkpoint"):
        convert(SAT / "small" / "checkpoint.pth.tar", SMALL / "vocab.pkl", tmp_path / "out", num_heads=4)
    with pytest.raises(CheckpointError, match="not an M2 Transformer checkpoint: .*has no 'state_dict'"):
        convert(SAT / "small" / "decoder_state_dict.pth", SMALL / "vocab.pkl", tmp_path / "out", num_heads=4)
    assert not (tmp_path / "out").exists()


def test_truncated_checkpoint(tmp_path):
    data = (SMALL / "checkpoint.pth").read_bytes()
    truncated = tmp_path / "checkpoint.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match=f"checkpoint file is truncated or corrupt: {truncated}"):
        convert(truncated, SMALL / "vocab.pkl", tmp_path / "out", num_heads=4)


def test_code_executing_checkpoint_and_vocabulary_are_refused(tmp_path):
    side_effect = Path(f"/tmp/pwned_{uuid.uuid4().hex}")
    checkpoint = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": {}, "epoch": RunsShellCommand(side_effect)}, checkpoint)
    with pytest.raises(UnsafePickleError, match=r"refusing to load posix\.system"):
        convert(checkpoint, SMALL / "vocab.pkl", tmp_path / "out")
    vocab = tmp_path / "vocab.pkl"
    vocab.write_bytes(pickle.dumps(RunsShellCommand(side_effect)))
    with pytest.raises(UnsafePickleError, match=r"refusing to load posix\.system: not an allowed class in a M2 "
                                                r"Transformer vocabulary"):
        convert(SMALL / "checkpoint.pth", vocab, tmp_path / "out", num_heads=4)
    assert not side_effect.exists() and not (tmp_path / "out").exists()


def test_state_dict_that_does_not_fit(tmp_path):
    checkpoint = load_checkpoint(SMALL / "checkpoint.pth", CHECKPOINT_ALLOWLIST)
    del checkpoint["state_dict"]["decoder.layers.1.fc_alpha3.bias"]
    checkpoint["state_dict"]["decoder.extra.weight"] = torch.zeros(1)
    damaged = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, damaged)
    with pytest.raises(CheckpointError, match=r"missing \['decoder.layers.1.fc_alpha.2.bias'\], unexpected "
                                              r"\['decoder.extra.weight'\]"):
        convert(damaged, SMALL / "vocab.pkl", tmp_path / "out", num_heads=4)


def test_vocabulary_problems(tmp_path):
    with pytest.raises(ValueError, match="vocabulary has 45 tokens but the checkpoint's word embedding has 54 rows"):
        convert(SMALL / "checkpoint.pth", M2 / "small-b" / "vocab.pkl", tmp_path / "out", num_heads=4)
    not_a_vocab = tmp_path / "list.pkl"
    not_a_vocab.write_bytes(pickle.dumps(["<unk>", "<pad>"]))
    with pytest.raises(ValueError, match="holds list, not the authors' data.vocab.Vocab"):
        read_vocabulary(not_a_vocab)
    with pytest.raises(CorruptCheckpointError, match="pickle file is truncated or corrupt"):
        read_vocabulary(SAT / "small" / "WORDMAP.json")
    with pytest.raises(FileNotFoundError, match="pickle file not found"):
        read_vocabulary(tmp_path / "nope.pkl")


def test_cli_flags_are_the_override_names():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--num-heads", "4", "--head-dim", "16", "--dropout", "0.2", "--image-size", "64",
                              "--num-beams", "3", "--max-new-tokens", "12"])
    assert vars(args) == {"num_heads": 4, "head_dim": 16, "dropout": 0.2, "image_size": 64, "num_beams": 3,
                          "max_new_tokens": 12}
    assert set(vars(args)) == set(OVERRIDES)
    assert vars(parser.parse_args([])) == {}  # absent flags are left out: the converter's defaults apply
