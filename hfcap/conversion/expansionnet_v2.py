"""Convert jchenghu/ExpansionNet_v2 checkpoints (ExpansionNet v2: ``End_ExpansionNet_v2``, or the body-only
``ExpansionNet_v2`` of their partial-training stages).

Input (spec expansionnet_v2.md §7, §12):
    checkpoint  the dict ``utils/saving_utils.save_last_checkpoint`` writes (e.g. the released ``rf_model.pth``):
                ``model_state_dict`` (no ``module.`` prefix; Swin under ``swin_transf.`` with the official Swin v1
                names, plus the buffers ``relative_position_index`` and ``attn_mask``), ``optimizer_state_dict``,
                ``scheduler_state_dict``, ``data_loader_state_dict``. Only tensors and plain values.
    vocab       their tokens pickle (``demo_material/demo_coco_tokens.pickle``): a dict with ``word2idx_dict``,
                ``idx2word_list`` (alphabetical, specials included: released EOS=77, PAD=78, SOS=79, UNK=80),
                ``sos_str``, ``eos_str``.

Output: a ``save_pretrained`` directory of :class:`ExpansionNetV2ForConditionalGeneration` + ``CaptioningProcessor``
(384x384 bilinear squash-resize, ImageNet mean/std, the authors' token ids) + ``generation_config.json``. Every size
the tensors determine is inferred: Swin's patch size, widths, depths, heads and window per stage (from the
relative-position tables), its input size (from the shift masks, when there are any), d_model, d_ff, layer counts,
expansion counts, vocabulary and position-table sizes. Overrides give the rest (``OVERRIDES``); one that contradicts
a shape is an error. The optimizer, scheduler and data-loader states are dropped, and so are Swin's buffers (timm
recomputes them). Without ``swin_transf.`` keys the result is a features-only model (``use_backbone=False``).
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError

from ..models.expansionnet_v2 import ExpansionNetV2Config, ExpansionNetV2ForConditionalGeneration
from .safe_unpickle import (
    CONTAINERS,
    NUMPY_ARRAYS,
    TORCH_TENSORS,
    Allowlist,
    CheckpointError,
    CorruptCheckpointError,
    UnsafePickleError,
    load_checkpoint,
    load_pickle,
)
from .writing import write_converted

EXPANSIONNET_V2_CHECKPOINT = Allowlist.build(
    "ExpansionNet v2 checkpoint",
    CONTAINERS,
    TORCH_TENSORS,
    # Their files hold no numpy, but another architecture's checkpoint (M² pickles numpy RNG state) then loads and is
    # reported as "not an ExpansionNet v2 checkpoint" instead of being refused as unsafe.
    NUMPY_ARRAYS,
)
"""``save_last_checkpoint`` files: state dicts of tensors, RAdam/LambdaLR states and data-loader counters."""

EXPANSIONNET_V2_VOCABULARY = Allowlist.build("ExpansionNet v2 vocabulary", CONTAINERS)
"""The tokens pickle: a plain dict of builtins."""

SWIN_PREFIX = "swin_transf."

BODY_KEYS = (
    "input_linear.weight",
    "vocab_linear.weight",
    "out_embedder.embed.weight",
    "pos_encoder.weight",
    "enc_reduce_group.weight",
    "dec_reduce_group.weight",
    "encoders.0.ff.linear_1.weight",
    "encoders.0.stc_exp.query_exp_vectors.weight",
    "decoders.0.dyn_exp.query_exp_vectors.weight",
)
"""Keys every ExpansionNet v2 state dict has (``End_ExpansionNet_v2`` and the body-only ``ExpansionNet_v2``)."""

BODY_RENAMES = (
    ("encoders.", "encoder.layers."),
    ("decoders.", "decoder.layers."),
    ("input_linear.", "encoder.input_linear."),
    ("enc_reduce_group.", "encoder.reduce_group."),
    ("enc_reduce_norm.", "encoder.reduce_norm."),
    ("dec_reduce_group.", "decoder.reduce_group."),
    ("dec_reduce_norm.", "decoder.reduce_norm."),
    ("out_embedder.embed.", "decoder.embed_tokens."),
    ("pos_encoder.", "decoder.embed_positions."),
    ("vocab_linear.", "lm_head."),
)
"""Reference prefix -> hfcap prefix; inside the layers the authors' names stay (norm_1, stc_exp, dyn_exp, mha …)."""

SWIN_L_384 = {
    "img_size": 384,
    "patch_size": 4,
    "in_chans": 3,
    "embed_dim": 192,
    "depths": [2, 2, 18, 2],
    "num_heads": [6, 12, 24, 48],
    "window_size": 12,
    "mlp_ratio": 4.0,
    "qkv_bias": True,
}
"""timm ``swin_large_patch4_window12_384``'s arguments = the authors' backbone (demo.py); ``backbone_kwargs`` holds
only what a checkpoint's Swin does differently."""

DEFAULT_STATIC_EXPANSION_GROUPS = [32, 64, 128, 256, 512]
DEFAULT_IMAGE_SIZE = 384

OVERRIDES = (
    "num_heads",
    "static_expansion_groups",
    "expansion_eps",
    "dropout_enc",
    "dropout_dec",
    "dropout_enc_input",
    "dropout_dec_input",
    "dropout_other",
    "image_size",
    "num_beams",
    "max_new_tokens",
)
READS = "an ExpansionNet v2 checkpoint (rf_model.pth) + tokens pickle"


def _not_expansionnet(path, problem: str) -> CheckpointError:
    return CheckpointError(f"not an ExpansionNet v2 checkpoint: {path}: {problem}")


def read_checkpoint(path) -> dict[str, torch.Tensor]:
    """Unpickle a ``save_last_checkpoint`` file safely and return its ``model_state_dict``."""
    try:
        checkpoint = load_checkpoint(path, EXPANSIONNET_V2_CHECKPOINT)
    except UnsafePickleError as error:
        raise UnsafePickleError(
            f"{path} is not an ExpansionNet v2 checkpoint (theirs hold only tensors and plain values): {error}"
        ) from error
    if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise _not_expansionnet(path, f"expected a dict with 'model_state_dict', found {found}")
    state = checkpoint["model_state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(tensor, torch.Tensor) for tensor in state.values()):
        raise _not_expansionnet(path, "'model_state_dict' is not a state dict of tensors")
    missing = [key for key in BODY_KEYS if key not in state]
    if missing:
        raise _not_expansionnet(path, f"the state dict lacks {', '.join(missing)}")
    return dict(state)


def read_vocabulary(path) -> tuple[list[str], dict[str, str]]:
    """The tokens pickle as ``(tokens, special_tokens)``: ``tokens[id]`` in the authors' (alphabetical) order and the
    tokenizer's ``pad/bos/eos/unk_token`` (``PAD``, ``sos_str``, ``eos_str``, ``UNK``)."""
    try:
        vocabulary = load_pickle(path, EXPANSIONNET_V2_VOCABULARY)
    except UnsafePickleError as error:
        raise UnsafePickleError(
            f"{path} is not an ExpansionNet v2 tokens pickle (theirs hold only builtins): {error}"
        ) from error
    except CorruptCheckpointError as error:
        raise CorruptCheckpointError(f"{path} is not an ExpansionNet v2 tokens pickle, or it is truncated") from error
    expected = {"word2idx_dict", "idx2word_list", "sos_str", "eos_str"}
    if not isinstance(vocabulary, dict) or not expected <= set(vocabulary):
        found = sorted(vocabulary) if isinstance(vocabulary, dict) else type(vocabulary).__name__
        raise ValueError(
            f"not an ExpansionNet v2 tokens pickle: {path}: expected keys {sorted(expected)}, found {found}"
        )
    tokens, word2idx = vocabulary["idx2word_list"], vocabulary["word2idx_dict"]
    if not isinstance(tokens, list) or not all(isinstance(token, str) for token in tokens):
        raise ValueError(f"{path}: idx2word_list is not a list of strings")
    if not isinstance(word2idx, dict) or word2idx != {token: index for index, token in enumerate(tokens)}:
        raise ValueError(f"{path}: word2idx_dict and idx2word_list disagree (the ids must be the list positions)")
    special_tokens = {
        "pad_token": "PAD",  # their dataset adds PAD and UNK under these fixed names (data/coco_dataset.py)
        "bos_token": vocabulary["sos_str"],
        "eos_token": vocabulary["eos_str"],
        "unk_token": "UNK",
    }
    missing = [token for token in special_tokens.values() if token not in word2idx]
    if missing:
        raise ValueError(f"{path} lacks the special tokens {', '.join(map(repr, missing))}")
    return tokens, special_tokens


def _count_indices(shapes: Mapping[str, Sequence[int]], pattern: str) -> int:
    """Number of distinct ``{i}`` in keys matching ``pattern`` (a regex with one group), checked to be 0..n-1."""
    indices = {int(match.group(1)) for key in shapes if (match := re.match(pattern, key))}
    if indices != set(range(len(indices))):
        raise CheckpointError(f"the checkpoint's indices for {pattern!r} are not 0..n-1: {sorted(indices)}")
    return len(indices)


def _window_from_table(rows: int, key: str) -> int:
    """A relative-position table has (2w - 1)^2 rows."""
    side = math.isqrt(rows)
    if side * side != rows or side % 2 == 0:
        raise CheckpointError(f"{key} has {rows} rows, not (2 * window - 1)^2 for an integer window")
    return (side + 1) // 2


def infer_swin_arguments(shapes: Mapping[str, Sequence[int]], image_size: int | None) -> tuple[dict, int]:
    """The timm Swin arguments of the checkpoint's ``swin_transf.`` tensors, and the input image size.

    Heads and windows come from each stage's relative-position tables ((2w - 1)^2 rows, one column per head); the
    configured window is the first stage's (later stages shrink it to their resolution, as timm does). The input size
    comes from a shifted block's ``attn_mask`` buffer ((resolution / window)^2 windows) or from a stage whose window
    shrank to its resolution, else from ``image_size`` (default 384); an ``image_size`` contradicting them is an
    error.
    """
    prefix = SWIN_PREFIX
    if f"{prefix}absolute_pos_embed" in shapes or f"{prefix}patch_embed.norm.weight" not in shapes:
        raise CheckpointError("the checkpoint's Swin uses ape=True or patch_norm=False, which timm's Swin cannot build")
    embed_dim, in_chans, patch_size, _ = shapes[f"{prefix}patch_embed.proj.weight"]
    num_stages = _count_indices(shapes, rf"{re.escape(prefix)}layers\.(\d+)\.")
    depths, num_heads, mlp_ratios, resolutions = [], [], set(), set()
    window_size = None
    for stage in range(num_stages):
        depth = _count_indices(shapes, rf"{re.escape(prefix)}layers\.{stage}\.blocks\.(\d+)\.")
        depths.append(depth)
        block = f"{prefix}layers.{stage}.blocks.0."
        table_key = f"{block}attn.relative_position_bias_table"
        rows, heads = shapes[table_key]
        num_heads.append(heads)
        stage_window = _window_from_table(rows, table_key)
        window_size = window_size or stage_window
        if stage_window < window_size:  # the stage's resolution is smaller than the window: the window is it
            resolutions.add(stage_window * patch_size * 2**stage)
        hidden, dim = shapes[f"{block}mlp.fc1.weight"]
        mlp_ratios.add(hidden / dim)
        for index in range(depth):
            mask_key = f"{prefix}layers.{stage}.blocks.{index}.attn_mask"
            if mask_key in shapes:
                num_windows, area, _ = shapes[mask_key]
                resolution = math.isqrt(area) * math.isqrt(num_windows)
                resolutions.add(resolution * patch_size * 2**stage)
    if len(mlp_ratios) != 1:
        raise CheckpointError(f"the checkpoint's Swin stages have different MLP ratios {sorted(mlp_ratios)}")
    if len(resolutions) > 1:
        raise CheckpointError(f"the checkpoint's Swin implies different input sizes {sorted(resolutions)}")
    if resolutions:
        (inferred_size,) = resolutions
        if image_size is not None and image_size != inferred_size:
            raise CheckpointError(
                f"image_size={image_size} contradicts the checkpoint: its Swin (shift masks, window sizes) is built "
                f"for {inferred_size}x{inferred_size} inputs"
            )
        image_size = inferred_size
    image_size = image_size or DEFAULT_IMAGE_SIZE
    arguments = {
        "img_size": image_size,
        "patch_size": patch_size,
        "in_chans": in_chans,
        "embed_dim": embed_dim,
        "depths": depths,
        "num_heads": num_heads,
        "window_size": window_size,
        "mlp_ratio": mlp_ratios.pop(),
        "qkv_bias": f"{prefix}layers.0.blocks.0.attn.qkv.bias" in shapes,
    }
    return arguments, image_size


def infer_config(
    shapes: Mapping[str, Sequence[int]],
    *,
    token_ids: Mapping[str, int] | None = None,
    num_heads: int = 8,
    static_expansion_groups: Sequence[int] | None = None,
    image_size: int | None = None,
    **config_overrides,
) -> tuple[ExpansionNetV2Config, int]:
    """The config of the model a state dict with these tensor ``shapes`` (key -> shape) belongs to, and the
    processor's image size.

    Args:
        shapes: ``model_state_dict`` key -> shape (buffers included: Swin's shift masks give the input size).
        token_ids: ``pad_token_id``, ``bos_token_id``, ``eos_token_id``, ``decoder_start_token_id`` (default: the
            released vocabulary's).
        num_heads: cross-attention heads (not in any shape; must divide d_model). The authors': 8.
        static_expansion_groups: the static expansion's group sizes (only their sum is in the shapes). Default
            [32, 64, 128, 256, 512], the authors'.
        image_size: the input size when the checkpoint's Swin has no shift mask to read it from (default 384).
        config_overrides: other [`ExpansionNetV2Config`] fields the shapes do not determine (dropouts,
            ``expansion_eps``).
    """
    d_model, visual_feature_dim = shapes["input_linear.weight"]
    num_rows = shapes["encoders.0.stc_exp.query_exp_vectors.weight"][0]
    groups = list(static_expansion_groups or DEFAULT_STATIC_EXPANSION_GROUPS)
    if sum(groups) != num_rows:
        raise CheckpointError(
            f"static_expansion_groups={groups} sums to {sum(groups)}, but the checkpoint's static expansion has "
            f"{num_rows} rows (encoders.0.stc_exp.query_exp_vectors.weight); pass the group sizes it was trained with"
        )
    if num_heads < 1 or d_model % num_heads:
        raise CheckpointError(f"num_heads={num_heads} does not divide the checkpoint's d_model={d_model}")
    uses_backbone = any(key.startswith(SWIN_PREFIX) for key in shapes)
    backbone_kwargs = None
    if uses_backbone:
        swin_arguments, image_size = infer_swin_arguments(shapes, image_size)
        backbone_kwargs = {name: value for name, value in swin_arguments.items() if SWIN_L_384[name] != value} or None
        final_dim = shapes[f"{SWIN_PREFIX}norm.weight"][0]
        if final_dim != visual_feature_dim:
            raise CheckpointError(
                f"the checkpoint's Swin outputs {final_dim} features but its input_linear takes {visual_feature_dim}"
            )
    image_size = image_size or DEFAULT_IMAGE_SIZE
    try:
        config = ExpansionNetV2Config(
            use_backbone=uses_backbone,
            backbone_kwargs=backbone_kwargs,
            visual_feature_dim=visual_feature_dim,
            vocab_size=shapes["vocab_linear.weight"][0],
            d_model=d_model,
            num_heads=num_heads,
            d_ff=shapes["encoders.0.ff.linear_1.weight"][0],
            num_encoder_layers=_count_indices(shapes, r"encoders\.(\d+)\."),
            num_decoder_layers=_count_indices(shapes, r"decoders\.(\d+)\."),
            static_expansion_groups=groups,
            num_dynamic_expansions=shapes["decoders.0.dyn_exp.query_exp_vectors.weight"][0],
            max_position_embeddings=shapes["pos_encoder.weight"][0],
            **dict(token_ids or {}),
            **config_overrides,
        )
    except StrictDataclassError as error:  # a setting out of range (e.g. a dropout above 1)
        raise ValueError(str(error)) from error
    return config, image_size


def map_key(key: str) -> str | None:
    """Reference ``model_state_dict`` key -> hfcap key; None for Swin's recomputed buffers (dropped).

    Swin keys map onto timm's Swin under ``encoder.backbone.``; the names agree except that timm ≥ 0.9 puts a stage's
    patch merging at the start of the next stage: reference ``layers.{s}.downsample`` -> timm
    ``layers.{s+1}.downsample``.
    """
    if key.startswith(SWIN_PREFIX):
        name = key[len(SWIN_PREFIX):]
        if name.endswith((".relative_position_index", ".attn_mask")):
            return None
        merging = re.match(r"layers\.(\d+)\.downsample\.(.+)", name)
        if merging:
            name = f"layers.{int(merging.group(1)) + 1}.downsample.{merging.group(2)}"
        return f"encoder.backbone.{name}"
    for old, new in BODY_RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    raise CheckpointError(f"unexpected key in an ExpansionNet v2 state dict: {key}")


def check_shapes(mapped_shapes: Mapping[str, Sequence[int]], model_shapes: Mapping[str, Sequence[int]]) -> None:
    """Every mapped tensor must land on a model tensor of the same shape, and fill every model tensor."""
    problems = []
    for key, shape in mapped_shapes.items():
        if key not in model_shapes:
            problems.append(f"{key} has no counterpart in the model")
        elif tuple(shape) != tuple(model_shapes[key]):
            problems.append(
                f"{key} has shape {tuple(shape)} in the checkpoint, {tuple(model_shapes[key])} in the model"
            )
    problems += [f"{key} is not in the checkpoint" for key in model_shapes if key not in mapped_shapes]
    if problems:
        raise CheckpointError("the checkpoint does not fit the inferred model: " + "; ".join(problems))


def convert(
    checkpoint,
    vocab,
    output_dir,
    *,
    image_size: int | None = None,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    **config_overrides,
) -> Path:
    """Convert an ExpansionNet v2 checkpoint + tokens pickle into a ``save_pretrained`` directory at ``output_dir``.

    Args:
        checkpoint: ``rf_model.pth`` (or any ``save_last_checkpoint`` file).
        vocab: their tokens pickle (``demo_coco_tokens.pickle``).
        output_dir: created if needed; receives model, processor and generation config.
        image_size: the processor's square input size; must match the checkpoint's Swin when its shift masks fix it.
            Default: inferred, else 384.
        num_beams, max_new_tokens: generation defaults; by default their test script's beam 5 and sequences up to
            the position-table size including SOS (73 new tokens for the released model).
        config_overrides: ``num_heads`` (default 8), ``static_expansion_groups`` (default [32, 64, 128, 256, 512]),
            ``expansion_eps`` and the five dropouts (default 0.0, their demo's), see [`ExpansionNetV2Config`].
    """
    unknown = sorted(set(config_overrides) - set(OVERRIDES))
    if unknown:
        raise ValueError(f"unknown ExpansionNet v2 conversion settings {unknown}; known: {', '.join(OVERRIDES)}")
    tokens, special_tokens = read_vocabulary(vocab)
    state = read_checkpoint(checkpoint)
    ids = {token: index for index, token in enumerate(tokens)}
    token_ids = {
        "pad_token_id": ids[special_tokens["pad_token"]],
        "bos_token_id": ids[special_tokens["bos_token"]],
        "eos_token_id": ids[special_tokens["eos_token"]],
        "decoder_start_token_id": ids[special_tokens["bos_token"]],
    }
    shapes = {key: tuple(tensor.shape) for key, tensor in state.items()}
    try:
        config, image_size = infer_config(shapes, token_ids=token_ids, image_size=image_size, **config_overrides)
    except KeyError as error:
        raise _not_expansionnet(checkpoint, f"the state dict lacks {error}") from error
    if len(tokens) != config.vocab_size:
        raise ValueError(
            f"vocabulary has {len(tokens)} words but the checkpoint's vocab_linear has {config.vocab_size} rows "
            f"({vocab} does not belong to {checkpoint})"
        )
    model = ExpansionNetV2ForConditionalGeneration(config)
    mapped = {map_key(key): tensor for key, tensor in state.items()}
    mapped.pop(None, None)
    check_shapes(
        {key: tensor.shape for key, tensor in mapped.items()},
        {key: tensor.shape for key, tensor in model.state_dict().items()},
    )
    model.load_state_dict(mapped, strict=True)
    if max_new_tokens is not None and max_new_tokens > config.max_position_embeddings:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} exceeds the position table ({config.max_position_embeddings} rows)"
        )
    return write_converted(model, tokens, special_tokens, output_dir, checkpoint=checkpoint, image_size=image_size,
                           resample="bilinear", num_beams=num_beams, max_new_tokens=max_new_tokens,
                           max_caption_length=config.max_position_embeddings - 1)  # SOS + words fit the table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``hfcap convert expansionnet-v2`` flags for what the checkpoint does not determine."""
    add = parser.add_argument
    add("--num-heads", dest="num_heads", type=int, default=argparse.SUPPRESS,
        help="cross-attention heads (default: 8, the authors')")
    add("--static-expansion-groups", dest="static_expansion_groups", type=int, nargs="+", default=argparse.SUPPRESS,
        help="group sizes of the static expansion (default: 32 64 128 256 512); only their sum is in the checkpoint")
    add("--expansion-eps", dest="expansion_eps", type=float, default=argparse.SUPPRESS,
        help="epsilon of the expansion normalisations (default: 1e-9)")
    for knob in ("enc", "dec", "enc_input", "dec_input", "other"):
        add(f"--dropout-{knob.replace('_', '-')}", dest=f"dropout_{knob}", type=float, default=argparse.SUPPRESS,
            help=f"the authors' drop_args.{knob} (default: 0.0, their demo's)")
    add("--image-size", dest="image_size", type=int, default=argparse.SUPPRESS,
        help="square input size (default: from the checkpoint's Swin, else 384)")
    add("--num-beams", dest="num_beams", type=int, default=argparse.SUPPRESS,
        help="default beam size in generation_config.json (default: 5, their test script's)")
    add("--max-new-tokens", dest="max_new_tokens", type=int, default=argparse.SUPPRESS,
        help="default generation length limit (default: the position-table size - 1, 73 for the released model)")
