"""Convert sgrvinod's a-PyTorch-Tutorial-to-Image-Captioning checkpoints (Show, Attend and Tell, soft attention).

Input (spec show_attend_tell.md §7):
    checkpoint  the dict ``utils.save_checkpoint`` writes: ``epoch``, ``epochs_since_improvement``, ``bleu-4``,
                ``encoder`` (a pickled ``models.Encoder``, a torchvision ResNet-101 trunk as ``resnet.0..7``, or None),
                ``decoder`` (a pickled ``models.DecoderWithAttention``), ``encoder_optimizer``, ``decoder_optimizer``;
                zip container (torch ≥ 1.6) or the legacy one of the released torch 0.4 file.
    vocab       ``WORDMAP_*.json``, word → id: ``<pad>``=0, words 1..n, ``<unk>``, ``<start>``, ``<end>``.

Output: a ``save_pretrained`` directory of :class:`ShowAttendTellForConditionalGeneration` + ``CaptioningProcessor``
+ ``generation_config.json``. Decoder weights keep their names under ``decoder.``; the ResNet trunk maps onto timm's
``resnet101`` under ``encoder.backbone.``. Every size is read from the tensor shapes. A checkpoint without an encoder
(``encoder=None``) gives a features-only model that takes ``visual_features (B, 196, visual_feature_dim)``.
Optimizer states and training counters are dropped.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import torch

from ..models.show_attend_tell import ShowAttendTellConfig, ShowAttendTellForConditionalGeneration
from .safe_unpickle import CONTAINERS, NUMPY_ARRAYS, TORCH_TENSORS, Allowlist, CheckpointError, load_checkpoint
from .writing import write_converted

logger = logging.getLogger(__name__)

CHECKPOINT_KEYS = frozenset(
    {"epoch", "epochs_since_improvement", "bleu-4", "encoder", "decoder", "encoder_optimizer", "decoder_optimizer"}
)
"""Keys of the tutorial's ``utils.save_checkpoint`` dict."""

DECODER_KEYS = (
    "attention.encoder_att.weight",
    "attention.encoder_att.bias",
    "attention.decoder_att.weight",
    "attention.decoder_att.bias",
    "attention.full_att.weight",
    "attention.full_att.bias",
    "embedding.weight",
    "decode_step.weight_ih",
    "decode_step.weight_hh",
    "decode_step.bias_ih",
    "decode_step.bias_hh",
    "init_h.weight",
    "init_h.bias",
    "init_c.weight",
    "init_c.bias",
    "f_beta.weight",
    "f_beta.bias",
    "fc.weight",
    "fc.bias",
)
"""``DecoderWithAttention.state_dict()`` keys, in order."""

RESNET_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
"""``Encoder.resnet`` = ``nn.Sequential(*list(resnet101.children())[:-2])``: positions 2 (relu) and 3 (maxpool) hold
no state. Inside the layers torchvision's and timm's Bottleneck names agree (conv1/bn1 … downsample.0/.1)."""

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<start>", "eos_token": "<end>", "unk_token": "<unk>"}

OVERRIDES = ("backbone", "image_size", "num_beams", "max_new_tokens")
READS = "a sgrvinod tutorial checkpoint + WORDMAP json"

TORCH_LAYERS = [
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.activation.Sigmoid",
    "torch.nn.modules.activation.Softmax",
    "torch.nn.modules.batchnorm.BatchNorm2d",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.conv.Conv2d",
    "torch.nn.modules.dropout.Dropout",
    "torch.nn.modules.linear.Linear",
    "torch.nn.modules.pooling.AdaptiveAvgPool2d",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.rnn.LSTMCell",
    "torch.nn.modules.sparse.Embedding",
]

CHECKPOINT_ALLOWLIST = Allowlist.build(
    "Show-Attend-Tell checkpoint",
    CONTAINERS,
    TORCH_TENSORS,
    # Not needed by the tutorial's files, but safe: another architecture's checkpoint (M² pickles numpy RNG state)
    # then loads and is reported as "not a Show-Attend-Tell checkpoint" instead of being refused as unsafe.
    NUMPY_ARRAYS,
    # torch 0.4 modules carry `_backend`, pickled as a call to this (torch keeps it as a no-op for old pickles).
    {"torch.nn.backends.thnn._get_thnn_function_backend": lambda: None},
    modules=[
        "models.Encoder",
        "models.DecoderWithAttention",
        "models.Attention",
        "torchvision.models.resnet.Bottleneck",
        *TORCH_LAYERS,
    ],
    objects=["torch.optim.adam.Adam"],
)
"""sgrvinod tutorial ``utils.save_checkpoint`` files: pickled Encoder/DecoderWithAttention modules, Adam optimizers."""


def _not_sat(path, problem: str) -> CheckpointError:
    return CheckpointError(f"not a Show-Attend-Tell checkpoint: {path}: {problem}")


def _expect_pickled(path, name: str, module, expected: str) -> None:
    if getattr(module, "pickled_name", None) != expected:
        raise _not_sat(path, f"'{name}' is {getattr(module, 'pickled_name', repr(module))}, not a pickled {expected}")


class TutorialCheckpoint(NamedTuple):
    """What the converter keeps of a tutorial checkpoint."""

    decoder_state: OrderedDict[str, torch.Tensor]
    encoder_state: OrderedDict[str, torch.Tensor] | None  # None when the file holds no encoder
    dropout: float  # p of the decoder's nn.Dropout before fc


def read_checkpoint(path) -> TutorialCheckpoint:
    """Unpickle the tutorial checkpoint safely and take the decoder's and encoder's state dicts and dropout."""
    checkpoint = load_checkpoint(path, CHECKPOINT_ALLOWLIST)
    if not isinstance(checkpoint, dict):
        raise _not_sat(path, f"it holds a {type(checkpoint).__name__}, not the tutorial's checkpoint dict")
    missing = CHECKPOINT_KEYS - set(checkpoint)
    if missing:
        raise _not_sat(path, f"the checkpoint dict lacks {', '.join(sorted(missing))}")
    decoder, encoder = checkpoint["decoder"], checkpoint["encoder"]
    _expect_pickled(path, "decoder", decoder, "models.DecoderWithAttention")
    if encoder is not None:
        _expect_pickled(path, "encoder", encoder, "models.Encoder")
    decoder_state = decoder.state_dict()
    if tuple(decoder_state) != DECODER_KEYS:
        raise _not_sat(path, f"the decoder's state dict has keys {list(decoder_state)}, expected {list(DECODER_KEYS)}")
    dropout = getattr(vars(decoder).get("_modules", {}).get("dropout"), "p", None)
    if not isinstance(dropout, float):
        raise _not_sat(path, "the decoder has no nn.Dropout module 'dropout'")
    return TutorialCheckpoint(decoder_state, encoder.state_dict() if encoder is not None else None, dropout)


def infer_decoder_dimensions(decoder_state) -> dict[str, int]:
    """``vocab_size, embed_dim, attention_dim, decoder_dim, encoder_dim`` from the decoder's tensor shapes.

    Every one of the 19 shapes is checked against the inferred sizes, so an inconsistent file fails here.
    """
    vocab_size, embed_dim = decoder_state["embedding.weight"].shape
    attention_dim, encoder_dim = decoder_state["attention.encoder_att.weight"].shape
    decoder_dim = decoder_state["attention.decoder_att.weight"].shape[1]
    gates = 4 * decoder_dim  # LSTMCell stacks the i, f, g, o gates
    expected = {
        "attention.encoder_att.weight": (attention_dim, encoder_dim),
        "attention.encoder_att.bias": (attention_dim,),
        "attention.decoder_att.weight": (attention_dim, decoder_dim),
        "attention.decoder_att.bias": (attention_dim,),
        "attention.full_att.weight": (1, attention_dim),
        "attention.full_att.bias": (1,),
        "embedding.weight": (vocab_size, embed_dim),
        "decode_step.weight_ih": (gates, embed_dim + encoder_dim),
        "decode_step.weight_hh": (gates, decoder_dim),
        "decode_step.bias_ih": (gates,),
        "decode_step.bias_hh": (gates,),
        "init_h.weight": (decoder_dim, encoder_dim),
        "init_h.bias": (decoder_dim,),
        "init_c.weight": (decoder_dim, encoder_dim),
        "init_c.bias": (decoder_dim,),
        "f_beta.weight": (encoder_dim, decoder_dim),
        "f_beta.bias": (encoder_dim,),
        "fc.weight": (vocab_size, decoder_dim),
        "fc.bias": (vocab_size,),
    }
    for key, shape in expected.items():
        if tuple(decoder_state[key].shape) != shape:
            raise CheckpointError(
                f"inconsistent Show-Attend-Tell decoder: {key} has shape {tuple(decoder_state[key].shape)}, "
                f"expected {shape} for vocab_size={vocab_size}, embed_dim={embed_dim}, attention_dim={attention_dim}, "
                f"decoder_dim={decoder_dim}, encoder_dim={encoder_dim}"
            )
    return {
        "vocab_size": vocab_size,
        "embed_dim": embed_dim,
        "attention_dim": attention_dim,
        "decoder_dim": decoder_dim,
        "encoder_dim": encoder_dim,
    }


def map_encoder_state_dict(encoder_state, backbone_state) -> dict[str, torch.Tensor]:
    """Rename the tutorial's ``resnet.<i>.…`` keys to timm ResNet keys and check them against ``backbone_state``.

    ``backbone_state`` is the state dict of the timm backbone the model builds (keys and shapes). Every checkpoint
    tensor must land on a backbone tensor of the same shape and every backbone tensor must be filled; the one exception
    is BatchNorm's ``num_batches_tracked``, which torch 0.4.0 did not have yet (the backbone's value is kept then).
    """
    mapped = {}
    for key, tensor in encoder_state.items():
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "resnet" or parts[1] not in RESNET_CHILDREN:
            raise CheckpointError(f"unexpected key in the Show-Attend-Tell encoder: {key}")
        target = f"{RESNET_CHILDREN[parts[1]]}.{parts[2]}"
        if target not in backbone_state:
            raise CheckpointError(f"encoder key {key} (-> {target}) has no counterpart in the timm backbone")
        if tensor.shape != backbone_state[target].shape:
            raise CheckpointError(
                f"encoder key {key} has shape {tuple(tensor.shape)} but the backbone's {target} has "
                f"{tuple(backbone_state[target].shape)}"
            )
        mapped[target] = tensor
    unfilled = [key for key in backbone_state if key not in mapped and not key.endswith("num_batches_tracked")]
    if unfilled:
        raise CheckpointError(f"the checkpoint's encoder does not fill these backbone tensors: {', '.join(unfilled)}")
    return mapped


def read_word_map(path) -> list[str]:
    """The WORDMAP json (word → id) as the token list ``tokens[id]``; ids must be exactly 0..n-1."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file not found: {path}")
    try:
        word_map = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"vocabulary file is not a WORDMAP json (word -> id): {path}: {error}") from error
    if not isinstance(word_map, dict) or not all(
        isinstance(word, str) and type(index) is int for word, index in word_map.items()
    ):
        raise ValueError(f"vocabulary file is not a WORDMAP json (an object mapping words to integer ids): {path}")
    tokens = sorted(word_map, key=word_map.get)
    if [word_map[token] for token in tokens] != list(range(len(tokens))):
        raise ValueError(f"the ids in {path} are not exactly 0..{len(tokens) - 1}")
    missing = [token for token in SPECIAL_TOKENS.values() if token not in word_map]
    if missing:
        raise ValueError(f"{path} lacks the tutorial's special tokens {', '.join(missing)}")
    return tokens


def convert(
    checkpoint,
    vocab,
    output_dir,
    *,
    backbone: str = "resnet101",
    image_size: int = 256,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
) -> Path:
    """Convert a tutorial checkpoint + WORDMAP json into a ``save_pretrained`` directory at ``output_dir``.

    Args:
        checkpoint: ``BEST_checkpoint_*.pth.tar`` (or any ``utils.save_checkpoint`` file).
        vocab: the matching ``WORDMAP_*.json``.
        output_dir: created if needed; receives model, processor and generation config.
        backbone: timm name of the CNN the pickled encoder is (the tutorial's ``torchvision.resnet101``).
        image_size: the square size images are resized to (the tutorial: 256, bilinear, ImageNet mean/std).
        num_beams, max_new_tokens: generation defaults written to ``generation_config.json``; by default the model's
            own, which are caption.py's (beam size 5, its best reported setting; at most 51 tokens, as its loop).
    """
    tokens = read_word_map(vocab)
    decoder_state, encoder_state, dropout = read_checkpoint(checkpoint)
    dims = infer_decoder_dimensions(decoder_state)
    if len(tokens) != dims["vocab_size"]:
        raise ValueError(
            f"vocabulary has {len(tokens)} words but the checkpoint's embedding has {dims['vocab_size']} rows "
            f"({vocab} does not belong to {checkpoint})"
        )
    ids = {token: index for index, token in enumerate(tokens)}
    config = ShowAttendTellConfig(
        vocab_size=dims["vocab_size"],
        embed_dim=dims["embed_dim"],
        attention_dim=dims["attention_dim"],
        d_model=dims["decoder_dim"],
        visual_feature_dim=dims["encoder_dim"],
        dropout=dropout,
        backbone=backbone,
        use_backbone=encoder_state is not None,
        bos_token_id=ids["<start>"],
        decoder_start_token_id=ids["<start>"],
        eos_token_id=ids["<end>"],
        pad_token_id=ids["<pad>"],
    )
    try:
        model = ShowAttendTellForConditionalGeneration(config)
    except ValueError as error:  # e.g. the backbone's channels differ from the decoder's encoder_dim
        raise CheckpointError(f"{checkpoint} does not fit a {backbone} backbone: {error}") from error
    state = {f"decoder.{key}": tensor for key, tensor in decoder_state.items()}  # load_state_dict copies
    if encoder_state is None:
        logger.warning(
            "%s holds no encoder (encoder=None): writing a FEATURES-ONLY model that takes visual_features "
            "(B, %d, %d) instead of pixel_values",
            checkpoint,
            config.encoder_grid_size**2,
            dims["encoder_dim"],
        )
    else:
        backbone_state = model.encoder.backbone.state_dict()
        mapped = map_encoder_state_dict(encoder_state, backbone_state)
        state.update({f"encoder.backbone.{key}": tensor for key, tensor in mapped.items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise CheckpointError(f"converted weights do not fit the model: missing {missing}, unexpected {unexpected}")
    return write_converted(model, tokens, SPECIAL_TOKENS, output_dir, checkpoint=checkpoint, image_size=image_size,
                           resample="bilinear", num_beams=num_beams, max_new_tokens=max_new_tokens)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``hfcap convert show-attend-tell`` flags for what the checkpoint does not determine."""
    add = parser.add_argument
    add("--backbone", default=argparse.SUPPRESS, help="timm name of the encoder CNN (default: resnet101)")
    add("--image-size", dest="image_size", type=int, default=argparse.SUPPRESS, help="resize size (default: 256)")
    add("--num-beams", dest="num_beams", type=int, default=argparse.SUPPRESS,
        help="default beam size in generation_config.json (default: 5, caption.py's)")
    add("--max-new-tokens", dest="max_new_tokens", type=int, default=argparse.SUPPRESS,
        help="default generation length limit (default: 51, caption.py's)")
