"""The allowlisting unpickler: the authors' object graphs load as inert stubs; anything else is refused unexecuted."""

import importlib
import json
import os
import pickle
import sys
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from hfcap.conversion.m2_transformer import CHECKPOINT_ALLOWLIST as M2_CHECKPOINT
from hfcap.conversion.m2_transformer import VOCABULARY_ALLOWLIST as M2_VOCABULARY
from hfcap.conversion.safe_unpickle import (
    CorruptCheckpointError,
    PickledModule,
    PickledObject,
    UnsafePickleError,
    load_checkpoint,
    load_pickle,
)
from hfcap.conversion.show_attend_tell import CHECKPOINT_ALLOWLIST as SHOW_ATTEND_TELL_CHECKPOINT

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "reference"
SAT_B = REFERENCE / "sat" / "small-b"
M2 = REFERENCE / "m2" / "small"


class _RunsShellCommand:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture
def authors_models_module(tmp_path, monkeypatch):
    """A throw-away top-level ``models`` module with a source file, like the tutorial's ``models.py``, so that the
    legacy container embeds the class source (as torch 0.4 did) and pickles the class as ``models.Attention``."""
    (tmp_path / "models.py").write_text(
        "import torch\n\n\n"
        "class Attention(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.encoder_att = torch.nn.Linear(4, 3)\n"
        "        self.relu = torch.nn.ReLU()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "models", raising=False)
    yield importlib.import_module("models")
    sys.modules.pop("models", None)


def test_full_sat_object_graph_unpickles_to_stubs_with_the_original_state_dicts():
    checkpoint = load_checkpoint(SAT_B / "checkpoint_full_structure.pth.tar", SHOW_ATTEND_TELL_CHECKPOINT)

    assert set(checkpoint) == {
        "epoch", "epochs_since_improvement", "bleu-4", "encoder", "decoder", "encoder_optimizer", "decoder_optimizer",
    }
    decoder, encoder, optimizer = checkpoint["decoder"], checkpoint["encoder"], checkpoint["decoder_optimizer"]
    assert isinstance(decoder, PickledModule) and decoder.pickled_name == "models.DecoderWithAttention"
    assert isinstance(encoder, PickledModule) and encoder.pickled_name == "models.Encoder"
    assert isinstance(optimizer, PickledObject) and optimizer.pickled_name == "torch.optim.adam.Adam"
    assert not isinstance(optimizer, PickledModule)

    reference = torch.load(SAT_B / "decoder_state_dict.pth", weights_only=True)
    decoder_state = decoder.state_dict()
    assert list(decoder_state) == list(reference)
    for key, tensor in reference.items():
        assert torch.equal(decoder_state[key], tensor), key

    entries = json.loads((SAT_B / "encoder_keys.json").read_text())["entries"]
    encoder_state = encoder.state_dict()
    assert list(encoder_state) == [entry["key"] for entry in entries]  # 624 incl. BN buffers, original order
    for entry in entries:
        tensor = encoder_state[entry["key"]]
        assert list(tensor.shape) == entry["shape"] and str(tensor.dtype) == f"torch.{entry['dtype']}"
        assert torch.all(tensor == entry["tag"]), entry["key"]


def _assert_refused(path, side_effect):
    with pytest.raises(UnsafePickleError, match=r"refusing to load posix\.system: not an allowed class in a "
                                                 r"Show-Attend-Tell checkpoint"):
        load_checkpoint(path, SHOW_ATTEND_TELL_CHECKPOINT)
    assert not side_effect.exists()


def test_code_executing_pickles_are_refused_in_every_container(tmp_path):
    side_effect = Path(f"/tmp/pwned_{uuid.uuid4().hex}")
    payload = {"decoder": _RunsShellCommand(f"touch {side_effect}")}

    raw = tmp_path / "raw.pth.tar"
    raw.write_bytes(pickle.dumps(payload, protocol=2))
    _assert_refused(raw, side_effect)

    zipped = tmp_path / "zip.pth.tar"
    torch.save(payload, zipped)
    _assert_refused(zipped, side_effect)

    legacy = tmp_path / "legacy.pth.tar"
    torch.save(payload, legacy, _use_new_zipfile_serialization=False)
    _assert_refused(legacy, side_effect)

    with pytest.raises(UnsafePickleError, match=r"refusing to load posix\.system: not an allowed class in a "
                                                 r"M2 Transformer vocabulary"):
        load_pickle(raw, M2_VOCABULARY)
    assert not side_effect.exists()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, but old archives exist
def test_torchscript_archives_are_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(UnsafePickleError, match="TorchScript archive"):
        load_checkpoint(path, SHOW_ATTEND_TELL_CHECKPOINT)


def test_legacy_container_with_pickled_modules(tmp_path, authors_models_module):
    module = authors_models_module.Attention()
    path = tmp_path / "legacy.pth.tar"
    torch.save({"decoder": module}, path, _use_new_zipfile_serialization=False)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the embedded source differs from the stub's: torch's warning is silenced
        loaded = load_checkpoint(path, SHOW_ATTEND_TELL_CHECKPOINT)["decoder"]
    assert loaded.pickled_name == "models.Attention" and isinstance(loaded, PickledModule)
    state = loaded.state_dict()
    assert list(state) == ["encoder_att.weight", "encoder_att.bias"]
    assert torch.equal(state["encoder_att.weight"], module.encoder_att.weight.detach())


def test_class_outside_the_allowlist_is_named(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"decoder": torch.nn.GRU(2, 2)}, path)
    with pytest.raises(UnsafePickleError, match=r"refusing to load torch\.nn\.modules\.rnn\.GRU"):
        load_checkpoint(path, SHOW_ATTEND_TELL_CHECKPOINT)


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_checkpoints_are_reported(tmp_path, legacy):
    full = tmp_path / "full.pth"
    torch.save({"weight": torch.randn(64, 64)}, full, _use_new_zipfile_serialization=not legacy)
    data = full.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match=f"checkpoint file is truncated or corrupt: {truncated}"):
        load_checkpoint(truncated, SHOW_ATTEND_TELL_CHECKPOINT)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint file not found: .*nope.pth"):
        load_checkpoint(tmp_path / "nope.pth", SHOW_ATTEND_TELL_CHECKPOINT)


def test_m2_vocabulary_and_checkpoint_load():
    case = json.loads((M2 / "case.json").read_text())
    vocab = load_pickle(M2 / "vocab.pkl", M2_VOCABULARY)
    assert vocab.pickled_name == "data.vocab.Vocab"
    assert vocab.itos == case["vocab"]["itos"]
    assert vocab.stoi["a-word-never-seen"] == 0  # the authors' default factory: unknown -> <unk>

    checkpoint = load_checkpoint(M2 / "checkpoint.pth", M2_CHECKPOINT)
    assert len(checkpoint["state_dict"]) == case["checkpoint"]["state_dict_entries"]
    assert checkpoint["epoch"] == case["checkpoint"]["values"]["epoch"]
    rng = np.random.RandomState()
    rng.set_state(checkpoint["numpy_rng_state"])  # the MT19937 state tuple rebuilt from numpy globals
    assert checkpoint["numpy_rng_state"][1].shape == (624,)


def test_protocol_2_bytes_only_through_latin1(tmp_path):
    plain = tmp_path / "bytes.pkl"
    plain.write_bytes(pickle.dumps({"blob": b"\x00\xffabc"}, protocol=2))
    assert load_pickle(plain, M2_VOCABULARY) == {"blob": b"\x00\xffabc"}

    class OtherCodec:
        def __reduce__(self):
            import _codecs

            return _codecs.encode, ("text", "rot13")

    crafted = tmp_path / "codec.pkl"
    crafted.write_bytes(pickle.dumps(OtherCodec(), protocol=2))
    with pytest.raises(UnsafePickleError, match="encoding 'rot13'"):
        load_pickle(crafted, M2_VOCABULARY)
