"""Convert aimagelab/meshed-memory-transformer checkpoints (Meshed-Memory Transformer, M²).

Input (spec m2.md §7, §12):
    checkpoint  the dict ``train.py`` saves (``meshed_memory_transformer.pth``): ``state_dict`` plus training keys
                (RNG states, ``epoch``, ``optimizer``, ``scheduler``, ``best_cider`` …), which are dropped, as are the
                eight ``running_*`` state buffers of the authors' stateful decoder; zip or legacy torch container.
    vocab       ``vocab.pkl``, a pickled ``data.vocab.Vocab`` (torchtext style): ``itos`` gives the ids, ``<unk>``=0
                ``<pad>``=1 ``<bos>``=2 ``<eos>``=3 in the released file. Read with a stub for the authors' module.

Output: a ``save_pretrained`` directory of a features-only :class:`M2TransformerForConditionalGeneration` (input:
bottom-up region features ``(B, N <= 50, d_in)`` + ``visual_attention_mask``) with the authors' input behaviour
(``mask_padded_regions=False``, ``pad_regions_to=50``), + ``CaptioningProcessor`` (tokenizer with the authors' ids)
+ ``generation_config.json`` (5 beams, 20 new tokens). Parameter names are kept, except ``fc_alpha{i}`` ->
``fc_alpha.{i-1}`` and ``decoder.pos_emb.weight`` -> ``decoder.position_table`` (the frozen random table is copied,
never regenerated). Every size is read from the tensor shapes; ``num_heads`` (the authors always use 8) and hence
``head_dim`` are not in them and come as overrides.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import re
from collections import OrderedDict
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError

from ..models.m2_transformer import M2TransformerConfig, M2TransformerForConditionalGeneration
from .safe_unpickle import (
    CONTAINERS,
    NUMPY_ARRAYS,
    TORCH_TENSORS,
    Allowlist,
    CheckpointError,
    UnsafePickleError,
    load_checkpoint,
    load_pickle,
)
from .writing import write_converted

logger = logging.getLogger(__name__)


def _default_unk_index() -> int:
    """The authors' ``data.vocab._default_unk_index`` (the ``stoi`` default factory): unknown words map to 0."""
    return 0


CHECKPOINT_ALLOWLIST = Allowlist.build("M2 Transformer checkpoint", CONTAINERS, TORCH_TENSORS, NUMPY_ARRAYS)
"""``train.py`` checkpoints: state dicts, optimizer and scheduler state, RNG states (numpy's included)."""

VOCABULARY_ALLOWLIST = Allowlist.build(
    "M2 Transformer vocabulary",
    CONTAINERS,
    {"data.vocab._default_unk_index": _default_unk_index},
    objects=["data.vocab.Vocab"],
)
"""``vocab.pkl``: a pickled ``data.vocab.Vocab`` (``freqs``, ``itos``, ``stoi``, ``vectors``)."""

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}

OVERRIDES = ("num_heads", "head_dim", "dropout", "image_size", "num_beams", "max_new_tokens")
READS = "a meshed-memory-transformer train.py checkpoint + pickled vocab.pkl"
"""What the checkpoint cannot determine: config fields (``num_heads`` / ``head_dim`` split the heads' total width;
``dropout``) and the processor's ``image_size`` and generation defaults."""

AUTHORS_NUM_HEADS = 8
"""train.py parses ``--head`` but never passes it on: every released or retrained checkpoint has 8 heads."""

AUTHORS_MAX_DETECTIONS = 50
"""``ImageDetectionsField(max_detections=50)`` in train.py and test.py: every image is padded to 50 regions."""

RUNNING_STATE = re.compile(r"(^|\.)running_(mask_self_attention|seq|keys|values)$")
"""The stateful decoder's ``register_state`` buffers: empty at save time, not part of the model."""


def _not_m2(path, problem: str) -> CheckpointError:
    return CheckpointError(f"not an M2 Transformer checkpoint: {path}: {problem}")


def read_state_dict(path) -> OrderedDict[str, torch.Tensor]:
    """Unpickle the ``train.py`` checkpoint safely; return its ``state_dict`` without the ``running_*`` buffers."""
    try:
        checkpoint = load_checkpoint(path, CHECKPOINT_ALLOWLIST)
    except UnsafePickleError as error:
        raise UnsafePickleError(
            f"{error} (M2's train.py pickles only tensors, containers and RNG states: {path} is another "
            "architecture's checkpoint, or not a safe file)"
        ) from error
    if not isinstance(checkpoint, dict):
        raise _not_m2(path, f"it holds a {type(checkpoint).__name__}, not train.py's checkpoint dict")
    state_dict = checkpoint.get("state_dict")
    if state_dict is None:
        keys = ", ".join(map(str, itertools.islice(checkpoint, 6))) + (", ..." if len(checkpoint) > 6 else "")
        raise _not_m2(path, f"the checkpoint dict has no 'state_dict' (its keys: {keys})")
    if not isinstance(state_dict, dict) or not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise _not_m2(path, "its 'state_dict' is not a mapping of names to tensors")
    return OrderedDict((key, value) for key, value in state_dict.items() if not RUNNING_STATE.search(key))


def _count_layers(state_dict, prefix: str) -> int:
    indices = {int(match.group(1)) for key in state_dict if (match := re.match(rf"{prefix}\.(\d+)\.", key))}
    if indices != set(range(len(indices))):
        raise CheckpointError(f"the checkpoint's {prefix} are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def infer_dimensions(path, state_dict) -> dict[str, int]:
    """Every size the tensor shapes determine: ``visual_feature_dim`` (d_in), ``d_model``, the heads' total width
    ``h * d_k``, ``d_ff``, ``num_memory_slots``, the layer counts, ``vocab_size``, ``max_position_embeddings``."""
    required = (
        "encoder.fc.weight",
        "encoder.layers.0.mhatt.attention.m_k",
        "encoder.layers.0.mhatt.attention.fc_v.weight",
        "encoder.layers.0.pwff.fc1.weight",
        "decoder.word_emb.weight",
        "decoder.pos_emb.weight",
    )
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise _not_m2(path, f"its state_dict lacks {', '.join(missing)}")
    d_model, visual_feature_dim = state_dict["encoder.fc.weight"].shape
    _, num_memory_slots, inner_dim = state_dict["encoder.layers.0.mhatt.attention.m_k"].shape
    value_dim = state_dict["encoder.layers.0.mhatt.attention.fc_v.weight"].shape[0]
    if value_dim != inner_dim:
        raise CheckpointError(f"{path}: d_v differs from d_k (h*d_v={value_dim}, h*d_k={inner_dim}); hfcap's M2 "
                              "Transformer has one head_dim for both")
    vocab_size = state_dict["decoder.word_emb.weight"].shape[0]
    return {
        "visual_feature_dim": visual_feature_dim,
        "d_model": d_model,
        "inner_dim": inner_dim,
        "d_ff": state_dict["encoder.layers.0.pwff.fc1.weight"].shape[0],
        "num_memory_slots": num_memory_slots,
        "num_encoder_layers": _count_layers(state_dict, "encoder.layers"),
        "num_decoder_layers": _count_layers(state_dict, "decoder.layers"),
        "vocab_size": vocab_size,
        "max_position_embeddings": state_dict["decoder.pos_emb.weight"].shape[0] - 1,
    }


def split_heads(path, inner_dim: int, num_heads: int | None, head_dim: int | None) -> tuple[int, int]:
    """``(num_heads, head_dim)`` with ``num_heads * head_dim`` = the checkpoint's ``h * d_k``; without either override
    the authors' 8 heads."""
    if num_heads is None and head_dim is None:
        num_heads = AUTHORS_NUM_HEADS
    if num_heads is None:
        num_heads = inner_dim // head_dim if head_dim and inner_dim % head_dim == 0 else 0
    if head_dim is None:
        head_dim = inner_dim // num_heads if num_heads and inner_dim % num_heads == 0 else 0
    if num_heads < 1 or head_dim < 1 or num_heads * head_dim != inner_dim:
        raise CheckpointError(
            f"{path}: its attention projections are h * d_k = {inner_dim} wide, which num_heads={num_heads or '?'} "
            f"and head_dim={head_dim or '?'} do not give; pass --num-heads (and/or --head-dim) matching the model"
        )
    return num_heads, head_dim


def map_state_dict(state_dict) -> dict[str, torch.Tensor]:
    """The authors' names -> hfcap's: ``fc_alpha{i}`` -> ``fc_alpha.{i-1}``, ``pos_emb.weight`` ->
    ``position_table``."""
    mapped = {}
    for key, tensor in state_dict.items():
        key = re.sub(r"\.fc_alpha(\d+)\.", lambda match: f".fc_alpha.{int(match.group(1)) - 1}.", key)
        mapped["decoder.position_table" if key == "decoder.pos_emb.weight" else key] = tensor
    return mapped


def read_vocabulary(path) -> list[str]:
    """The pickled ``data.vocab.Vocab``'s ``itos`` (token of each id); the four special tokens must be in it."""
    vocab = load_pickle(path, VOCABULARY_ALLOWLIST)
    if getattr(vocab, "pickled_name", None) != "data.vocab.Vocab":
        raise ValueError(f"vocabulary file {path} holds {type(vocab).__name__}, not the authors' data.vocab.Vocab")
    tokens = getattr(vocab, "itos", None)
    if not isinstance(tokens, list) or not all(isinstance(token, str) for token in tokens):
        raise ValueError(f"the Vocab in {path} has no token list `itos`")
    missing = [token for token in SPECIAL_TOKENS.values() if token not in tokens]
    if missing:
        raise ValueError(f"{path} lacks the authors' special tokens {', '.join(missing)}")
    return tokens


def convert(
    checkpoint,
    vocab,
    output_dir,
    *,
    num_heads: int | None = None,
    head_dim: int | None = None,
    dropout: float = 0.1,
    image_size: int = 224,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
) -> Path:
    """Convert a ``train.py`` checkpoint + ``vocab.pkl`` into a ``save_pretrained`` directory at ``output_dir``.

    Args:
        checkpoint: ``meshed_memory_transformer.pth`` (or any ``train.py`` checkpoint).
        vocab: the matching ``vocab.pkl``.
        output_dir: created if needed; receives model, processor and generation config.
        num_heads, head_dim: attention heads and their width, of which the shapes give only the product
            (default: the authors' 8 heads).
        dropout: the model's dropout (the authors': 0.1; not stored in the checkpoint).
        image_size: the processor's square image size, for a backbone added later (the converted model takes
            region features).
        num_beams, max_new_tokens: generation defaults written to ``generation_config.json``; by default the
            authors' (5 beams, 20 tokens).
    """
    tokens = read_vocabulary(vocab)
    state_dict = read_state_dict(checkpoint)
    dims = infer_dimensions(checkpoint, state_dict)
    num_heads, head_dim = split_heads(checkpoint, dims.pop("inner_dim"), num_heads, head_dim)
    if len(tokens) != dims["vocab_size"]:
        raise ValueError(
            f"vocabulary has {len(tokens)} tokens but the checkpoint's word embedding has {dims['vocab_size']} rows "
            f"({vocab} does not belong to {checkpoint})"
        )
    for name, value in (("image_size", image_size), ("num_beams", num_beams), ("max_new_tokens", max_new_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value}")
    ids = {token: index for index, token in enumerate(tokens)}
    try:
        config = M2TransformerConfig(
            **dims,
            num_heads=num_heads,
            head_dim=head_dim,
            dropout=dropout,
            use_backbone=False,
            mask_padded_regions=False,
            pad_regions_to=AUTHORS_MAX_DETECTIONS,
            position_embedding_type="frozen_random",
            pad_token_id=ids["<pad>"],
            bos_token_id=ids["<bos>"],
            decoder_start_token_id=ids["<bos>"],
            eos_token_id=ids["<eos>"],
        )
    except StrictDataclassError as error:  # e.g. dropout outside [0, 1]
        raise ValueError(f"invalid M2 Transformer setting: {error}") from error
    model = M2TransformerForConditionalGeneration(config)
    expected = model.state_dict()
    mapped = map_state_dict(state_dict)
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    if missing or unexpected:
        raise _not_m2(checkpoint, f"its state_dict does not fit the M2 Transformer: missing {missing}, unexpected "
                                  f"{unexpected}")
    for key, tensor in mapped.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"inconsistent M2 Transformer checkpoint {checkpoint}: {key} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(expected[key].shape)} for {dims}, num_heads={num_heads}, head_dim={head_dim}"
            )
    model.load_state_dict(mapped)
    logger.info("converted %s: %s, num_heads=%d, head_dim=%d", checkpoint, dims, num_heads, head_dim)
    return write_converted(model, tokens, SPECIAL_TOKENS, output_dir, checkpoint=checkpoint, image_size=image_size,
                           resample="bicubic", num_beams=num_beams, max_new_tokens=max_new_tokens,
                           max_caption_length=config.max_position_embeddings - 1)  # <bos> + words fill the table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``hfcap convert m2-transformer`` flags for what the checkpoint does not determine."""
    add = parser.add_argument
    add("--num-heads", dest="num_heads", type=int, default=argparse.SUPPRESS,
        help="attention heads (default: 8, what the authors' train.py always builds)")
    add("--head-dim", dest="head_dim", type=int, default=argparse.SUPPRESS,
        help="width d_k = d_v of each head (default: the heads' total width / num-heads)")
    add("--dropout", type=float, default=argparse.SUPPRESS, help="dropout of the model (default: 0.1, the authors')")
    add("--image-size", dest="image_size", type=int, default=argparse.SUPPRESS,
        help="processor image size, for a backbone added later (default: 224)")
    add("--num-beams", dest="num_beams", type=int, default=argparse.SUPPRESS,
        help="default beam size in generation_config.json (default: 5, the authors')")
    add("--max-new-tokens", dest="max_new_tokens", type=int, default=argparse.SUPPRESS,
        help="default generation length limit (default: 20, the authors')")
