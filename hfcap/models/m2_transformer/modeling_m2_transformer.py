"""PyTorch Meshed-Memory Transformer (M², Cornia et al., CVPR 2020), as in aimagelab/meshed-memory-transformer.

Reading guide. "§n" is a section of the hfcap M² spec (specs/m2.md); file:line points into the authors' repository.
Visual features (bottom-up regions, or a timm backbone's grid) -> input projection (§2, encoders.py:58-62) ->
memory-augmented encoder (§3; memory-augmented attention §4) whose L layer outputs are the L levels X̃_1..X̃_L ->
meshed decoder (§5: masked self-attention S, one cross-attention C_i = C(X̃_i, S) shared by all levels, sigmoid
gates alpha_i = sigmoid(W_i [S; C_i] + b_i), M = sum_i alpha_i * C_i / sqrt(L)) -> bias-free output projection (§6).
Decoding: HF strategies with a KV cache; the authors' beam search (§8b) and their consecutive-duplicate removal (§7).
With a converted checkpoint and the converter's config this module computes exactly what the authors' code computes.

Shapes: B batch, T decoder steps of this call, S decoder positions incl. cached ones, N visual positions,
D visual_feature_dim, d d_model, H num_heads, d_k head_dim, m num_memory_slots, L encoder levels, V vocab_size.
"""

import itertools
import math
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache
from transformers.modeling_outputs import Seq2SeqLMOutput
from transformers.utils import ModelOutput

from .configuration_m2_transformer import M2TransformerConfig

GENERATION_DEFAULTS = {"num_beams": 5, "max_new_tokens": 20}
"""The authors' decoding setting (test.py: `beam_search(images, 20, <eos>, 5)`), the defaults of `generate`
(`__init__` lowers `max_new_tokens` to `max_new_tokens_limit` for smaller position tables)."""


# Copied from hfcap.compat.CACHE_NAME
CACHE_NAME = "cache" if "cache" in Seq2SeqLMOutput.__dataclass_fields__ else "past_key_values"
"""The decoder cache's argument and output-field name in the running transformers ("cache" from 5.25 on)."""


# Copied from hfcap.compat.resolve_cache
def resolve_cache(cache=None, past_key_values=None):
    """The decoder cache passed to `forward` under either name (`cache`, or `past_key_values` before transformers
    5.25); passing two different objects is an error."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the decoder cache as `cache` or as `past_key_values` (its name before transformers "
                         "5.25), not both.")
    return cache if cache is not None else past_key_values


@dataclass
class M2TransformerEncoderOutput(ModelOutput):
    """
    The encoder's levels. Every tensor field has the batch first, so that `generate` repeats them per beam.

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(B, L, N, d)`): the outputs of all L encoder layers, stacked
            (the authors' `MultiLevelEncoder` output): the meshed decoder attends to every level.
        attention_mask (`torch.LongTensor` of shape `(B, N)`, *optional*): 1 = a position the decoder attends to,
            0 = masked. With `mask_padded_regions=False` it is the authors' mask (all ones in practice).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): with `output_hidden_states`, the projected input and
            each layer's output, `(B, N, d)` each.
        attentions (`tuple(torch.FloatTensor)`, *optional*): with `output_attentions`, one `(B, H, N, N + m)` per
            layer: attention over the N positions, then the m memory slots.
    """

    last_hidden_state: torch.FloatTensor | None = None
    attention_mask: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class M2TransformerSeq2SeqLMOutput(Seq2SeqLMOutput):
    """
    [`Seq2SeqLMOutput`] plus the meshed gates.

    Args:
        loss (`torch.FloatTensor` of shape `()`): token cross-entropy, mean over the labels that are not -100.
        logits (`torch.FloatTensor` of shape `(B, T, V)`): next-token scores; `log_softmax(logits)` is the authors'
            decoder output.
        cache ([`EncoderDecoderCache`]): self-attention K/V per decoder layer and the meshed cross-attention's K/V
            per (decoder layer, level), when `use_cache=True` (`past_key_values` before transformers 5.25).
        decoder_hidden_states (`tuple(torch.FloatTensor)`): the embeddings and each decoder layer's output, `(B, T, d)`.
        decoder_attentions (`tuple(torch.FloatTensor)`): one `(B, H, T, S)` per decoder layer (self-attention).
        cross_attentions (`tuple(torch.FloatTensor)`): one `(B, L, H, T, N)` per decoder layer: the shared
            cross-attention's weights over the N visual positions, for every level.
        encoder_last_hidden_state (`torch.FloatTensor` of shape `(B, L, N, d)`): the encoder's levels.
        meshed_gates (`tuple(torch.FloatTensor)`): with `output_attentions`, one `(B, L, T, d)` per decoder layer:
            the gates alpha_i that weight each level's cross-attention output.
    """

    meshed_gates: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class M2TransformerBeamSearchOutput(ModelOutput):
    """
    Result of the authors' beam search (`custom_generate=hfcap.reference_beam_search` with
    `return_dict_in_generate=True`).

    Args:
        sequences (`torch.LongTensor` of shape `(B * R, 1 + T)`): `<bos> w_1 ... <eos>`, right-padded with
            `pad_token_id` (where the authors keep extending a finished beam with token 0); R =
            `num_return_sequences` hypotheses per image, best first.
        sequences_scores (`torch.FloatTensor` of shape `(B * R,)`): raw sums of the tokens' log-probabilities
            (`<eos>` included), the authors' `seq_logprob`.
        cross_attentions (`tuple(torch.FloatTensor)`): with `output_attentions=True`, one `(B * R, L, H, T, N)` per
            decoder layer; step t is the attention that produced token t + 1 (zeros after `<eos>`).
    """

    sequences: torch.LongTensor | None = None
    sequences_scores: torch.FloatTensor | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None


def remove_consecutive_duplicate_words(caption: str) -> str:
    """
    The authors' evaluation post-processing (test.py:29, train.py:58): `"a man man riding a a horse"` ->
    `"a man riding a horse"` (`itertools.groupby` over the words). Apply it to decoded captions (cut at `<eos>`)
    before scoring them, to compare with the published M² numbers; the model itself never uses it.
    """
    return " ".join(word for word, _ in itertools.groupby(caption.split()))


# Copied from hfcap.models.show_attend_tell.modeling_show_attend_tell.shift_tokens_right
def shift_tokens_right(labels, pad_token_id, decoder_start_token_id):
    """`labels (B, T)` -> `decoder_input_ids (B, T)`: prepend the start token, drop the last label, -100 -> pad."""
    decoder_input_ids = labels.new_full(labels.shape, pad_token_id)
    decoder_input_ids[:, 1:] = labels[:, :-1]
    decoder_input_ids[:, 0] = decoder_start_token_id
    return decoder_input_ids.masked_fill(decoder_input_ids == -100, pad_token_id)


# Copied from hfcap.models.show_attend_tell.modeling_show_attend_tell.create_timm_backbone
def create_timm_backbone(config, **timm_kwargs):
    """The timm model named `config.backbone` (with `config.backbone_kwargs` and `timm_kwargs`), with timm's pretrained
    weights when `config.use_pretrained_backbone` (never while `from_pretrained` builds the model on the meta device:
    the checkpoint brings the weights then). Its modules are marked for `_init_weights` (`init_timm_module`)."""
    if not timm.is_model(config.backbone):
        raise ValueError(f"`backbone={config.backbone!r}` is not a timm model name (see `timm.list_models()`).")
    building_on_meta = torch.empty(0).is_meta
    pretrained = config.use_pretrained_backbone and not building_on_meta
    try:
        backbone = timm.create_model(config.backbone, pretrained=pretrained, **timm_kwargs,
                                     **(config.backbone_kwargs or {}))
    except OSError as error:
        raise OSError(
            f"`use_pretrained_backbone=True` needs timm's pretrained weights for {config.backbone!r} from the "
            "Hugging Face Hub, which could not be loaded. Make the Hub reachable or set `use_pretrained_backbone=False`."
        ) from error
    for module in backbone.modules():
        module.in_timm_backbone = True
    if not building_on_meta:
        # timm has initialised the backbone (or loaded its pretrained weights): `post_init` must leave it alone. Not
        # under `from_pretrained`: there the mark would keep the tensors a checkpoint lacks out of its missing keys,
        # and so on the meta device, uninitialised.
        for tensor in [*backbone.parameters(), *backbone.buffers()]:
            tensor._is_hf_initialized = True
    return backbone


# Copied from hfcap.models.show_attend_tell.modeling_show_attend_tell.create_feature_map_backbone
def create_feature_map_backbone(config):
    """`create_timm_backbone` returning only the last feature map, whose channels must be `config.visual_feature_dim`."""
    backbone = create_timm_backbone(config, features_only=True, out_indices=(-1,))
    channels = backbone.feature_info.channels()[-1]
    if channels != config.visual_feature_dim:
        raise ValueError(
            f"The last feature map of backbone {config.backbone!r} has {channels} channels but "
            f"`visual_feature_dim={config.visual_feature_dim}`; set `visual_feature_dim={channels}` or choose "
            "another backbone."
        )
    return backbone


# Copied from hfcap.models.show_attend_tell.modeling_show_attend_tell.init_timm_module
def init_timm_module(module):
    """
    Initialises one module of a timm backbone for `_init_weights`: its parameters and persistent buffers unless all
    are initialised already (by timm or its pretrained weights at construction, by the checkpoint under
    `from_pretrained`, which builds the model on the meta device and initialises only what the checkpoint lacks), and
    its recomputed (non-persistent) buffers. The check comes first because timm's `reset_parameters` (e.g. Swin's
    attention) use timm's own init functions, which transformers' guard against re-initialisation does not cover.
    """
    stored = [*module.parameters(recurse=False)] + [
        buffer for name, buffer in module.named_buffers(recurse=False) if name not in module._non_persistent_buffers_set
    ]
    if not all(getattr(tensor, "_is_hf_initialized", False) for tensor in stored):
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        else:  # parameters held directly by a module without one: timm's usual truncated normal
            for parameter in module.parameters(recurse=False):
                init.trunc_normal_(parameter, std=0.02)
    if hasattr(module, "init_non_persistent_buffers"):
        module.init_non_persistent_buffers()


# Copied from hfcap.models.show_attend_tell.modeling_show_attend_tell.check_visual_inputs
def check_visual_inputs(config, num_channels, pixel_values=None, visual_features=None, visual_attention_mask=None):
    """The model's check of its visual inputs (`forward`, `generate` and the reference search all pass here): exactly
    one of `pixel_values (B, C, H, W)` and `visual_features (B, N, D)`, floating point, non-empty and finite with
    plausible magnitudes (a corrupt input gives an error, not a caption), and a mask with a real position per image."""
    if (pixel_values is None) == (visual_features is None):
        raise ValueError("Pass exactly one of `pixel_values` (B, C, H, W) and `visual_features` (B, N, D).")
    name, value = ("pixel_values", pixel_values) if pixel_values is not None else ("visual_features", visual_features)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch tensor (use the processor's return_tensors='pt'), got "
                         f"{type(value).__name__}.")
    if pixel_values is not None:
        if visual_attention_mask is not None:
            raise ValueError("`visual_attention_mask` goes with `visual_features`, not with `pixel_values`.")
        shape, limit = f"(batch, {num_channels}, height, width)", 1e4  # normalised images lie within about ±10
        valid_shape = value.ndim == 4 and value.shape[1] == num_channels
    else:
        shape, limit = f"(batch, num_positions, {config.visual_feature_dim})", 1e6
        valid_shape = value.ndim == 3 and value.shape[-1] == config.visual_feature_dim
    if not valid_shape or 0 in value.shape:
        raise ValueError(f"`{name}` must have shape {shape} with no empty axis, got {tuple(value.shape)}.")
    if not value.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor, got dtype {value.dtype}.")
    if value.is_meta:
        raise ValueError(f"`{name}` is a meta tensor (it holds no values).")
    if visual_attention_mask is not None and (
        not isinstance(visual_attention_mask, torch.Tensor) or visual_attention_mask.shape != value.shape[:2]
    ):
        raise ValueError(f"`visual_attention_mask` must be a tensor of shape {tuple(value.shape[:2])}, got "
                         f"{getattr(visual_attention_mask, 'shape', type(visual_attention_mask).__name__)}.")
    if torch.compiler.is_compiling():  # tracing (`torch.export`) has shapes but no values to check
        return
    largest = value.detach().abs().amax()
    if not largest <= limit:  # also true for NaN
        raise ValueError(f"`{name}` holds NaN, infinite or implausibly large values (max |x| = {largest.item():g}).")
    if visual_attention_mask is not None and not visual_attention_mask.to(torch.bool).any(dim=1).all():
        raise ValueError("`visual_attention_mask` has an image without any real position (an all-zero row).")


# Copied from hfcap.models.show_attend_tell.modeling_show_attend_tell.check_token_ids
def check_token_ids(name, ids, vocab_size, batch_size=None, allow_ignore_index=False):
    """`decoder_input_ids` / `labels` (B, T): an integer tensor of ids in [0, vocab_size) (-100 too for labels, with
    at least one real label), non-empty, whose batch agrees with the images'."""
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or 0 in ids.shape:
        raise ValueError(f"`{name}` must be a non-empty tensor of shape (batch, length), got "
                         f"{getattr(ids, 'shape', type(ids).__name__)}.")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"`{name}` must hold integer token ids, got dtype {ids.dtype}.")
    if batch_size is not None and ids.shape[0] != batch_size:
        raise ValueError(f"`{name}` has batch size {ids.shape[0]} but the images {batch_size}.")
    if torch.compiler.is_compiling():  # tracing (`torch.export`) has shapes but no values to check
        return
    real = ids != -100 if allow_ignore_index else torch.ones_like(ids, dtype=torch.bool)
    if allow_ignore_index and not real.any():
        raise ValueError(f"`{name}` are all -100 (ignored): there is nothing to compute a loss on.")
    outside = real & ((ids < 0) | (ids >= vocab_size))
    if outside.any():
        raise ValueError(f"`{name}` holds ids outside the vocabulary [0, {vocab_size}): "
                         f"{sorted(set(ids[outside].tolist()))[:5]}.")


# Copied from hfcap.models.show_attend_tell.modeling_show_attend_tell.check_encoder_hidden_states
def check_encoder_hidden_states(hidden_states, expected_shape):
    """The `last_hidden_state` of `encoder_outputs` passed in (by `generate`, or precomputed): a non-empty tensor of
    `expected_shape`, what the model's encoder returns (None: any size)."""
    shape = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else None
    if shape is None or len(shape) != len(expected_shape) or 0 in shape or any(
        size is not None and size != actual for size, actual in zip(expected_shape, shape)
    ):
        expected = ", ".join("*" if size is None else str(size) for size in expected_shape)
        raise ValueError(f"`encoder_outputs.last_hidden_state` must have shape ({expected}), what this model's encoder "
                         f"returns, got {shape if shape is not None else type(hidden_states).__name__}.")


def sinusoid_position_table(num_positions, dim):
    """The authors' `sinusoid_encoding_table(num_positions, dim, padding_idx=0)` (utils.py): sin at even, cos at odd
    features, row 0 (padded positions) zero."""
    positions = torch.arange(num_positions, dtype=torch.float32).view(-1, 1)
    frequencies = torch.arange(dim // 2, dtype=torch.float32).view(1, -1)
    angles = positions / 10000 ** (2 * frequencies / dim)
    table = torch.zeros(num_positions, dim)
    table[:, ::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    table[0] = 0
    return table


class M2TransformerZeroBiasLinear(nn.Linear):
    """A linear layer whose bias the authors initialise to 0 (attention projections and meshed gates, attention.py
    and decoders.py `init_weights`); `_init_weights` recognises it by its class."""


class M2TransformerAttention(nn.Module):
    """
    Multi-head scaled dot-product attention (attention.py `ScaledDotProductAttention`); with `num_memory_slots > 0`
    the memory-augmented attention of §4 (`ScaledDotProductAttentionMemory`). Parameter names are the authors'.
    Keys and values are projected separately (`project_keys_values`) so that callers can cache them.
    """

    def __init__(self, config: M2TransformerConfig, num_memory_slots: int = 0):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.num_memory_slots = num_memory_slots
        inner_dim = config.num_heads * config.head_dim
        self.fc_q = M2TransformerZeroBiasLinear(config.d_model, inner_dim)
        self.fc_k = M2TransformerZeroBiasLinear(config.d_model, inner_dim)
        self.fc_v = M2TransformerZeroBiasLinear(config.d_model, inner_dim)
        self.fc_o = M2TransformerZeroBiasLinear(inner_dim, config.d_model)
        if num_memory_slots:
            self.m_k = nn.Parameter(torch.empty(1, num_memory_slots, inner_dim))
            self.m_v = nn.Parameter(torch.empty(1, num_memory_slots, inner_dim))

    def _split_heads(self, states):
        """`(B, S, H * d_k)` -> `(B, H, S, d_k)`; head-major, as the authors' `view(b, n, h, d_k)`."""
        return states.view(*states.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)

    def project_keys_values(self, hidden_states):
        """
        Keys and values of `hidden_states (B, S, d)`, each `(B, H, S + m, d_k)`: the m memory slots come last.
        """
        keys = self.fc_k(hidden_states)
        values = self.fc_v(hidden_states)
        if self.num_memory_slots:
            batch_size = hidden_states.shape[0]
            # §4: slots appended after the projections (never projected); keys scaled by sqrt(d_k), values by sqrt(m)
            memory_keys = math.sqrt(self.head_dim) * self.m_k.expand(batch_size, -1, -1)
            memory_values = math.sqrt(self.num_memory_slots) * self.m_v.expand(batch_size, -1, -1)
            keys = torch.cat([keys, memory_keys], dim=1)
            values = torch.cat([values, memory_values], dim=1)
        return self._split_heads(keys), self._split_heads(values)

    def forward(self, queries, keys, values, masked=None):
        """
        Args:
            queries (`torch.FloatTensor` of shape `(B, T, d)`).
            keys, values (`torch.FloatTensor` of shape `(B, H, S + m, d_k)`): from `project_keys_values`.
            masked (`torch.BoolTensor` broadcastable to `(B, H, T, S)`, *optional*): True = not attended. It covers
                the S projected positions only: memory slots are never masked.

        Returns:
            `(output (B, T, d), weights (B, H, T, S + m))`.
        """
        query_states = self._split_heads(self.fc_q(queries))
        scores = torch.matmul(query_states, keys.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if masked is not None:
            masked = F.pad(masked, (0, self.num_memory_slots), value=False)
            # the finite minimum gives the same zero weights as the authors' -inf, and no NaN for fully masked rows
            scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-1)
        output = torch.matmul(weights, values).transpose(1, 2).flatten(2)
        return self.fc_o(output), weights


class M2TransformerMultiHeadAttention(nn.Module):
    """attention.py `MultiHeadAttention`, post-LN: `LayerNorm(queries + Dropout(attention(queries, keys, values)))`."""

    def __init__(self, config: M2TransformerConfig, num_memory_slots: int = 0):
        super().__init__()
        self.attention = M2TransformerAttention(config, num_memory_slots)
        self.dropout = nn.Dropout(config.dropout)
        self.layer_norm = nn.LayerNorm(config.d_model)

    def forward(self, queries, keys, values, masked=None):
        """As [`M2TransformerAttention.forward`], with the residual connection and LayerNorm."""
        output, weights = self.attention(queries, keys, values, masked)
        return self.layer_norm(queries + self.dropout(output)), weights


class M2TransformerFeedForward(nn.Module):
    """utils.py `PositionWiseFeedForward`, post-LN: `LayerNorm(x + Dropout(fc2(Dropout(ReLU(fc1(x))))))`."""

    def __init__(self, config: M2TransformerConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.d_ff)
        self.fc2 = nn.Linear(config.d_ff, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.dropout_2 = nn.Dropout(config.dropout)
        self.layer_norm = nn.LayerNorm(config.d_model)

    def forward(self, hidden_states):
        output = self.fc2(self.dropout_2(F.relu(self.fc1(hidden_states))))
        return self.layer_norm(hidden_states + self.dropout(output))


class M2TransformerEncoderLayer(nn.Module):
    """encoders.py `EncoderLayer` (§3): memory-augmented self-attention, then the feed-forward layer."""

    def __init__(self, config: M2TransformerConfig):
        super().__init__()
        self.mhatt = M2TransformerMultiHeadAttention(config, config.num_memory_slots)
        self.pwff = M2TransformerFeedForward(config)

    def forward(self, hidden_states, masked=None):
        """`hidden_states (B, N, d)`, `masked (B, 1, 1, N)` -> `(output (B, N, d), weights (B, H, N, N + m))`."""
        keys, values = self.mhatt.attention.project_keys_values(hidden_states)
        attended, weights = self.mhatt(hidden_states, keys, values, masked)
        return self.pwff(attended), weights


class M2TransformerEncoder(nn.Module):
    """
    The backbone stage (optional), the input projection (§2) and the memory-augmented encoder (§3): encoders.py
    `MemoryAugmentedEncoder`. Returns the L layer outputs stacked, and the mask the decoder uses.
    """

    main_input_name = "pixel_values"

    def __init__(self, config: M2TransformerConfig):
        super().__init__()
        self.config = config
        self.num_channels = (config.backbone_kwargs or {}).get("in_chans", 3)
        self.backbone = None
        if config.use_backbone:
            self.backbone = create_feature_map_backbone(config)
        self.fc = nn.Linear(config.visual_feature_dim, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.layer_norm = nn.LayerNorm(config.d_model)
        self.layers = nn.ModuleList(M2TransformerEncoderLayer(config) for _ in range(config.num_encoder_layers))

    def forward_backbone(self, pixel_values):
        """The backbone stage on checked `pixel_values (B, C, H, W)`: the last feature map flattened row-major,
        `(B, N, D)`."""
        feature_map = self.backbone(pixel_values)[-1]
        if self.backbone.output_fmt == "NHWC":  # timm's transformer backbones (e.g. Swin) are channels-last
            return feature_map.flatten(1, 2)
        return feature_map.flatten(2).transpose(1, 2)

    # Copied from hfcap.models.show_attend_tell.modeling_show_attend_tell.ShowAttendTellEncoder.get_image_features
    def get_image_features(self, pixel_values):
        """
        `pixel_values (B, C, H, W)` -> `visual_features (B, N, D)`: the backbone stage (`forward_backbone`) on checked
        pixels. Images smaller than the backbone's output stride (its last map would come from padding alone), or
        that the backbone rejects, are a ValueError naming their size.
        """
        if self.backbone is None:
            raise ValueError(
                "This model has no backbone (`use_backbone=False`, features only): pass `visual_features` "
                f"(batch, num_positions, {self.config.visual_feature_dim}) instead of `pixel_values`."
            )
        check_visual_inputs(self.config, self.num_channels, pixel_values=pixel_values)
        height, width = pixel_values.shape[-2:]
        stride = self.backbone.feature_info[-1]["reduction"]
        if min(height, width) < stride:
            raise ValueError(
                f"`pixel_values` of {height}x{width} px are smaller than the output stride {stride} of backbone "
                f"{self.config.backbone!r}; pass images of at least {stride}x{stride} px (the processor's size)."
            )
        try:
            return self.forward_backbone(pixel_values.to(next(self.backbone.parameters()).dtype))
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as error:
            raise ValueError(
                f"Backbone {self.config.backbone!r} cannot take `pixel_values` of {height}x{width} px: {error}"
            ) from error

    def forward(
        self,
        pixel_values=None,
        visual_features=None,
        visual_attention_mask=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        """
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, height, width)`): images from the processor.
            visual_features (`torch.FloatTensor` of shape `(B, N, D)`): precomputed features instead (bottom-up
                regions, or cached `get_image_features` output).
            visual_attention_mask (`torch.LongTensor` of shape `(B, N)`, *optional*): 1 = real position, 0 = padding.
            output_attentions (`bool`, *optional*): also return each layer's attention weights.
            output_hidden_states (`bool`, *optional*): also return the projected input and each layer's output.

        Returns:
            [`M2TransformerEncoderOutput`] (a tuple if `return_dict=False`).
        """
        check_visual_inputs(self.config, self.num_channels, pixel_values, visual_features, visual_attention_mask)
        features = self.get_image_features(pixel_values) if pixel_values is not None else visual_features
        features = features.to(self.fc.weight.dtype)
        if visual_attention_mask is not None and not self.config.mask_padded_regions:
            features = features.masked_fill(visual_attention_mask.unsqueeze(-1) == 0, 0.0)  # the authors' zero rows
        if self.config.pad_regions_to is not None:
            features, visual_attention_mask = self._pad_regions(features, visual_attention_mask)

        hidden_states = self.layer_norm(self.dropout(F.relu(self.fc(features))))  # §2 input projection
        if self.config.mask_padded_regions:
            attention_mask = visual_attention_mask.long() if visual_attention_mask is not None else None
        else:
            # §3 the authors' padding mask: on the projected, normalised rows (in practice it masks nothing)
            attention_mask = hidden_states.sum(-1).ne(0).long()
        masked = None if attention_mask is None else attention_mask.eq(0)[:, None, None, :]

        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        levels = []
        for layer in self.layers:
            hidden_states, weights = layer(hidden_states, masked)
            levels.append(hidden_states)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (weights,)
        output = M2TransformerEncoderOutput(
            last_hidden_state=torch.stack(levels, dim=1),
            attention_mask=attention_mask,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )
        return output if return_dict is not False else output.to_tuple()

    def _pad_regions(self, features, visual_attention_mask):
        """Zero-pad `features (B, N, D)` (and its mask) to `pad_regions_to` positions, as the authors' data field."""
        target = self.config.pad_regions_to
        num_positions = features.shape[1]
        if num_positions > target:
            raise ValueError(
                f"This model encodes at most {target} visual positions (`pad_regions_to`), got {num_positions}; keep "
                f"the first {target} (the authors keep an image's first 50 detections) or change `pad_regions_to`."
            )
        features = F.pad(features, (0, 0, 0, target - num_positions))
        if visual_attention_mask is None:
            visual_attention_mask = features.new_ones(features.shape[0], num_positions, dtype=torch.long)
        return features, F.pad(visual_attention_mask, (0, target - num_positions))


class M2TransformerDecoderLayer(nn.Module):
    """decoders.py `MeshedDecoderLayer` (§5); parameter names are the authors' (`fc_alpha{i}` -> `fc_alpha.{i-1}`)."""

    def __init__(self, config: M2TransformerConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_levels = config.num_encoder_layers
        self.self_att = M2TransformerMultiHeadAttention(config)
        self.enc_att = M2TransformerMultiHeadAttention(config)  # one cross-attention for every level (§5 step 2)
        self.pwff = M2TransformerFeedForward(config)
        self.fc_alpha = nn.ModuleList(
            M2TransformerZeroBiasLinear(2 * config.d_model, config.d_model) for _ in range(self.num_levels)
        )

    def forward(self, hidden_states, encoder_levels, self_masked, cross_masked, query_mask=None, cache=None):
        """
        Args:
            hidden_states (`torch.FloatTensor` of shape `(B, T, d)`).
            encoder_levels (`torch.FloatTensor` of shape `(B, L, N, d)`): read only where the cache lacks its K/V.
            self_masked (`torch.BoolTensor` of shape `(B | 1, 1, T, S)`): causal and padding mask, True = masked.
            cross_masked (`torch.BoolTensor` of shape `(B, 1, 1, N)`, *optional*): masked visual positions.
            query_mask (`torch.FloatTensor` of shape `(B, T, 1)`, *optional*): 0 at padded decoder positions, whose
                outputs the authors zero after every block.
            cache ([`EncoderDecoderCache`], *optional*).

        Returns:
            `(output (B, T, d), self-attention (B, H, T, S), cross-attention (B, L, H, T, N), gates (B, L, T, d))`.
        """
        keys, values = self.self_att.attention.project_keys_values(hidden_states)
        if cache is not None:
            keys, values = cache.self_attention_cache.update(keys, values, self.layer_idx)
        self_attended, self_weights = self.self_att(hidden_states, keys, values, self_masked)  # S (§5 step 1)
        self_attended = _zero_padded_positions(self_attended, query_mask)

        meshed, cross_weights, gates = 0.0, [], []
        for level in range(self.num_levels):
            keys, values = self._cross_keys_values(encoder_levels, level, cache)
            cross, weights = self.enc_att(self_attended, keys, values, cross_masked)  # C_i = C(X̃_i, S) (§5 step 2)
            cross = _zero_padded_positions(cross, query_mask)
            # alpha_i = sigmoid(W_i [S; C_i] + b_i), one gate layer per level (§5 step 3)
            gate = torch.sigmoid(self.fc_alpha[level](torch.cat([self_attended, cross], dim=-1)))
            meshed = meshed + cross * gate
            cross_weights.append(weights)
            gates.append(gate)
        # §5 steps 4-5: the gated sum is divided by sqrt(L) (np.sqrt(3) in decoders.py), not averaged
        meshed = _zero_padded_positions(meshed / math.sqrt(self.num_levels), query_mask)
        output = _zero_padded_positions(self.pwff(meshed), query_mask)  # §5 step 6
        return output, self_weights, torch.stack(cross_weights, dim=1), torch.stack(gates, dim=1)

    def _cross_keys_values(self, encoder_levels, level, cache):
        """The shared cross-attention's K/V of one level, computed once per generation (hf_stack.md §3)."""
        cache_idx = self.layer_idx * self.num_levels + level
        if cache is not None and cache.is_updated.get(cache_idx):
            cached = cache.cross_attention_cache.layers[cache_idx]
            return cached.keys, cached.values
        keys, values = self.enc_att.attention.project_keys_values(encoder_levels[:, level])
        if cache is not None:
            keys, values = cache.cross_attention_cache.update(keys, values, cache_idx)
            cache.is_updated[cache_idx] = True
        return keys, values


def _zero_padded_positions(hidden_states, query_mask):
    """The authors' `* mask_pad` (decoders.py): outputs at padded decoder positions become 0."""
    return hidden_states if query_mask is None else hidden_states * query_mask


class M2TransformerDecoder(nn.Module):
    """decoders.py `MeshedDecoder` (§6): word embeddings + frozen position table, meshed layers, bias-free output."""

    def __init__(self, config: M2TransformerConfig):
        super().__init__()
        self.config = config
        self.word_emb = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        # the authors' `pos_emb` is frozen: a buffer keeps it out of the optimizer (row 0 = padded positions)
        self.register_buffer("position_table", torch.empty(config.max_position_embeddings + 1, config.d_model))
        self.layers = nn.ModuleList(
            M2TransformerDecoderLayer(config, layer_idx) for layer_idx in range(config.num_decoder_layers)
        )
        self.fc = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(
        self,
        input_ids,
        encoder_levels,
        encoder_attention_mask=None,
        attention_mask=None,
        cache=None,
        output_attentions=False,
        output_hidden_states=False,
    ):
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(B, T)`): the tokens after the `S - T` cached ones.
            encoder_levels (`torch.FloatTensor` of shape `(B, L, N, d)`).
            encoder_attention_mask (`torch.LongTensor` of shape `(B, N)`, *optional*): 0 = masked visual position.
            attention_mask (`torch.LongTensor` of shape `(B, S')`, *optional*): by absolute position, 0 = padding
                (never attended, output zeroed, position index 0, as the authors' `<pad>`); positions >= S' count
                as 1. Without it no position is padding (pad tokens are not detected from their ids).
            cache ([`EncoderDecoderCache`], *optional*): updated in place.

        Returns:
            `(logits (B, T, V), hidden_states, self_attentions, cross_attentions, gates)`; the last four are tuples
            with one entry per layer (hidden states: embeddings first), or None when not asked for.
        """
        batch_size, length = input_ids.shape
        past_length = cache.get_seq_length() if cache is not None else 0
        total_length = past_length + length
        if total_length > self.config.max_position_embeddings:
            raise ValueError(
                f"The decoder takes at most `max_position_embeddings={self.config.max_position_embeddings}` tokens "
                f"(the authors' `max_len`), got {total_length}."
            )
        if cache is not None:
            self._grow_cross_attention_cache(cache)

        device = input_ids.device
        dtype = self.fc.weight.dtype
        causal = torch.ones(length, total_length, dtype=torch.bool, device=device).triu(past_length + 1)
        if attention_mask is None:
            positions = torch.arange(past_length + 1, total_length + 1, device=device).expand(batch_size, -1)
            self_masked, query_mask = causal[None, None], None
        else:
            padding = _full_length_mask(attention_mask, batch_size, total_length).to(device)
            positions = (padding.cumsum(-1) * padding)[:, past_length:]  # 1, 2, ... over real tokens, 0 at padding
            self_masked = causal[None, None] | padding.eq(0)[:, None, None, :]
            query_mask = padding[:, past_length:, None].to(dtype)
        cross_masked = None if encoder_attention_mask is None else encoder_attention_mask.eq(0)[:, None, None, :]
        encoder_levels = encoder_levels.to(dtype)

        hidden_states = self.word_emb(input_ids) + F.embedding(positions, self.position_table)  # no dropout (§6)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        self_attentions, cross_attentions, gates = ((), (), ()) if output_attentions else (None, None, None)
        for layer in self.layers:
            hidden_states, self_weights, cross_weights, layer_gates = layer(
                hidden_states, encoder_levels, self_masked, cross_masked, query_mask, cache
            )
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                self_attentions += (self_weights,)
                cross_attentions += (cross_weights,)
                gates += (layer_gates,)
        return self.fc(hidden_states), all_hidden_states, self_attentions, cross_attentions, gates

    def _grow_cross_attention_cache(self, cache):
        """`generate` sizes the cross-attention cache for one K/V pair per decoder layer; the meshed cross-attention
        keeps one per (decoder layer, level), at index `layer * L + level`."""
        cross_cache = cache.cross_attention_cache
        needed = len(self.layers) * self.config.num_encoder_layers
        if cross_cache.layer_class_to_replicate is None and len(cross_cache.layers) < needed:
            cross_cache.layers.extend(DynamicLayer() for _ in range(needed - len(cross_cache.layers)))


def _full_length_mask(attention_mask, batch_size, total_length):
    """A decoder mask `(B, S')` as `(B, S)`: positions after S' (e.g. generated after a masked prompt) count as 1."""
    if attention_mask.ndim != 2 or attention_mask.shape[0] != batch_size or attention_mask.shape[1] > total_length:
        raise ValueError(
            f"The decoder attention mask must have shape ({batch_size}, <= {total_length}) (batch, positions so far), "
            f"got {tuple(attention_mask.shape)}."
        )
    return F.pad(attention_mask.long(), (0, total_length - attention_mask.shape[1]), value=1)


class M2TransformerPreTrainedModel(PreTrainedModel):
    config_class = M2TransformerConfig
    base_model_prefix = "m2_transformer"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module):
        """
        The authors' init: every layer's PyTorch default, attention and gate biases 0 (attention.py, decoders.py
        `init_weights`), and `xavier_uniform_` on every matrix (transformer.py `init_weights`: memory slots, word
        embeddings and output projection included). The position table: see `position_embedding_type`. A backbone
        built from the config keeps timm's own init (or its pretrained weights); one that `from_pretrained` finds
        missing from the checkpoint is initialised as timm's layers do (`init_timm_module`).
        """
        if getattr(module, "in_timm_backbone", False):
            init_timm_module(module)
        elif isinstance(module, M2TransformerDecoder):
            if self.config.position_embedding_type == "frozen_random":
                init.xavier_uniform_(module.position_table)
            else:
                init.copy_(module.position_table, sinusoid_position_table(*module.position_table.shape))
        elif isinstance(module, M2TransformerAttention) and module.num_memory_slots:  # its own parameters
            init.xavier_uniform_(module.m_k)
            init.xavier_uniform_(module.m_v)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            module.reset_parameters()
            init.xavier_uniform_(module.weight)
            if isinstance(module, M2TransformerZeroBiasLinear):
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            module.reset_parameters()

    @property
    def max_new_tokens_limit(self):
        """The most new tokens `generate` agrees to decode: the decoder takes `max_position_embeddings` tokens, `<bos>`
        included, and the last generated token is never fed back."""
        return self.config.max_position_embeddings

    # Copied from hfcap.models.show_attend_tell.modeling_show_attend_tell.ShowAttendTellPreTrainedModel.backbone
    @property
    def backbone(self):
        """The timm backbone of the backbone stage (None for a features-only model); the trainer freezes its stages."""
        return self.get_encoder().backbone

    # Copied from hfcap.models.show_attend_tell.modeling_show_attend_tell.ShowAttendTellPreTrainedModel.get_image_features
    def get_image_features(self, pixel_values):
        """The backbone stage: `pixel_values (B, C, H, W)` -> `visual_features (B, N, D)`, which every method taking
        `pixel_values` also accepts instead (the feature cache stores them)."""
        return self.get_encoder().get_image_features(pixel_values)

    # Copied from hfcap.models.show_attend_tell.modeling_show_attend_tell.ShowAttendTellPreTrainedModel.save_pretrained
    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; as Hub remote code, `auto_map` also maps `AutoModel` to this class
        (transformers records only one auto class per model class)."""
        if self.is_remote_code():
            class_ref = f"{type(self).__module__.rpartition('.')[2]}.{type(self).__name__}"
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), "AutoModel": class_ref}
        return super().save_pretrained(save_directory, *args, **kwargs)

    # Copied from hfcap.models.show_attend_tell.modeling_show_attend_tell.ShowAttendTellPreTrainedModel.generate
    @torch.no_grad()
    def generate(
        self, pixel_values=None, generation_config=None, *, visual_features=None, visual_attention_mask=None, **kwargs
    ):
        """
        [`GenerationMixin.generate`] from `pixel_values` or from precomputed `visual_features (B, N, D)` (+ optional
        `visual_attention_mask`). `custom_generate=hfcap.reference_beam_search` runs the authors' beam search.
        The inputs and the decoder prompt (`input_ids` / `decoder_input_ids`) are checked before decoding starts, and
        `max_new_tokens` (`max_length`, which counts the start token, minus 1) may not exceed the model's
        `max_new_tokens_limit`.
        """
        if visual_features is not None or visual_attention_mask is not None:
            if pixel_values is not None or kwargs.get("encoder_outputs") is not None:
                raise ValueError("Pass exactly one of `pixel_values`, `visual_features` and `encoder_outputs`.")
            kwargs["encoder_outputs"] = self.get_encoder()(
                visual_features=visual_features, visual_attention_mask=visual_attention_mask
            )
        elif pixel_values is not None:
            check_visual_inputs(self.config, self.get_encoder().num_channels, pixel_values=pixel_values)
        elif kwargs.get("encoder_outputs") is None:
            raise ValueError("Pass the images: exactly one of `pixel_values` (B, C, H, W) and `visual_features` "
                             "(B, N, D).")
        encoder_outputs = kwargs.get("encoder_outputs")
        images = pixel_values if encoder_outputs is None else encoder_outputs[0]
        for name in ("input_ids", "decoder_input_ids"):
            if kwargs.get(name) is not None:
                batch_size = images.shape[0] if isinstance(images, torch.Tensor) else None
                check_token_ids(name, kwargs[name], self.config.vocab_size, batch_size)
        # every length the call asks for, else the configured one that transformers will use
        lengths = {name: kwargs[name] for name in ("max_new_tokens", "max_length") if kwargs.get(name) is not None}
        if not lengths:
            config = generation_config or self.generation_config
            name = "max_new_tokens" if config.max_new_tokens is not None else "max_length"
            lengths[name] = getattr(config, name)
        for name, value in lengths.items():
            ceiling = self.max_new_tokens_limit + (name == "max_length")  # `max_length` counts the start token
            if value is not None and not 1 <= value <= ceiling:
                raise ValueError(f"`{name}` must lie in [1, {ceiling}] for this model, got {value}.")
        return super().generate(pixel_values, generation_config, **kwargs)


class M2TransformerForConditionalGeneration(M2TransformerPreTrainedModel, GenerationMixin):
    """
    Meshed-Memory Transformer captioner: `encoder` (optional timm backbone, input projection, memory-augmented layers)
    and `decoder` (meshed decoder). Inputs: `pixel_values`, or `visual_features` (+ `visual_attention_mask`) such as
    the authors' bottom-up region features.

    Generation: every standard `generate` strategy with a KV cache (`EncoderDecoderCache`); the authors' beam search
    with `custom_generate=hfcap.reference_beam_search`. Defaults (`GENERATION_DEFAULTS`): the authors' 5 beams and
    20 new tokens. For evaluation parity apply `remove_consecutive_duplicate_words` to the decoded captions.
    """

    def __init__(self, config: M2TransformerConfig):
        super().__init__(config)
        self.encoder = M2TransformerEncoder(config)
        self.decoder = M2TransformerDecoder(config)
        self.post_init()
        self.generation_config.update(**GENERATION_DEFAULTS)
        self.generation_config.max_new_tokens = min(GENERATION_DEFAULTS["max_new_tokens"], self.max_new_tokens_limit)

    def get_encoder(self):
        return self.encoder

    def get_input_embeddings(self):
        return self.decoder.word_emb

    def set_input_embeddings(self, value):
        self.decoder.word_emb = value

    def get_output_embeddings(self):
        return self.decoder.fc

    def set_output_embeddings(self, new_embeddings):
        self.decoder.fc = new_embeddings

    def forward(
        self,
        pixel_values=None,
        visual_features=None,
        visual_attention_mask=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        attention_mask=None,
        encoder_outputs=None,
        cache=None,
        past_key_values=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        label_smoothing=0.0,
        **kwargs,
    ):
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`): images from the processor.
            visual_features (`torch.FloatTensor` of shape `(B, N, D)`): precomputed features (instead).
            visual_attention_mask (`torch.LongTensor` of shape `(B, N)`, *optional*): 1 = real position, 0 = padding.
            decoder_input_ids (`torch.LongTensor` of shape `(B, T)`): `<bos> w_1 ...`; made from `labels` if absent.
            decoder_attention_mask (`torch.LongTensor` of shape `(B, S')`, *optional*): 0 marks decoder padding
                (see [`M2TransformerDecoder.forward`]); for the authors' teacher forcing pass `ids != <pad>`.
            attention_mask (`torch.LongTensor`, *optional*): the processor's mask of its `input_ids` prompts, as the
                pipeline passes it to `generate`; same meaning as `decoder_attention_mask` (used when that is absent).
            encoder_outputs ([`M2TransformerEncoderOutput`], *optional*): precomputed encoder output.
            cache ([`EncoderDecoderCache`], *optional*): continue from these keys and values (`past_key_values` is
                the same argument under its name before transformers 5.25).
            labels (`torch.LongTensor` of shape `(B, T)`): `w_1 ... <eos>`, -100 ignored.
            use_cache (`bool`, *optional*): return the cache (a new one if none was passed).
            output_attentions (`bool`, *optional*): return self-, cross-attention weights and the meshed gates.
            output_hidden_states (`bool`, *optional*): return the encoder's and decoder's hidden states.
            label_smoothing (`float`, defaults to 0.0): label smoothing of the loss (a training choice, per call).
            kwargs: ignored (accepted for what `generate` passes).

        Returns:
            [`M2TransformerSeq2SeqLMOutput`] (a tuple if `return_dict=False`).
        """
        cache = resolve_cache(cache, past_key_values)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                pixel_values=pixel_values,
                visual_features=visual_features,
                visual_attention_mask=visual_attention_mask,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
            )
        else:
            if not isinstance(encoder_outputs, ModelOutput):  # a tuple from `return_dict=False`
                mask = encoder_outputs[1] if len(encoder_outputs) > 1 and torch.is_tensor(encoder_outputs[1]) else None
                encoder_outputs = M2TransformerEncoderOutput(last_hidden_state=encoder_outputs[0], attention_mask=mask)
            check_encoder_hidden_states(
                encoder_outputs.last_hidden_state, (None, self.config.num_encoder_layers, None, self.config.d_model)
            )

        if labels is not None:
            check_token_ids("labels", labels, self.config.vocab_size, allow_ignore_index=True)
            if decoder_input_ids is None:
                decoder_input_ids = shift_tokens_right(
                    labels, self.config.pad_token_id, self.config.decoder_start_token_id
                )
            elif labels.shape != decoder_input_ids.shape:
                raise ValueError(f"`labels` {tuple(labels.shape)} and `decoder_input_ids` "
                                 f"{tuple(decoder_input_ids.shape)} must have the same shape.")
        if decoder_input_ids is None:
            raise ValueError("Pass `decoder_input_ids` (B, T) or `labels` (B, T) to run the decoder.")
        if cache is None:  # a decoding step of `generate` only feeds back the model's own tokens: checked once
            batch_size = encoder_outputs.last_hidden_state.shape[0]
            check_token_ids("decoder_input_ids", decoder_input_ids, self.config.vocab_size, batch_size)
        if cache is None and use_cache:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        if cache is not None and not isinstance(cache, EncoderDecoderCache):
            raise ValueError(f"The cache must be an `EncoderDecoderCache`, got {type(cache).__name__}.")

        logits, hidden_states, self_attentions, cross_attentions, gates = self.decoder(
            decoder_input_ids,
            encoder_outputs.last_hidden_state,
            encoder_outputs.get("attention_mask"),
            attention_mask=decoder_attention_mask if decoder_attention_mask is not None else attention_mask,
            cache=cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                label_smoothing=label_smoothing,
            )
        output = M2TransformerSeq2SeqLMOutput(
            loss=loss,
            logits=logits,
            **{CACHE_NAME: cache if use_cache else None},
            decoder_hidden_states=hidden_states,
            decoder_attentions=self_attentions,
            cross_attentions=cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.get("hidden_states"),
            encoder_attentions=encoder_outputs.get("attentions"),
            meshed_gates=gates,
        )
        return output if return_dict else output.to_tuple()

    @torch.no_grad()
    def _reference_beam_search(
        self, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None, **model_kwargs
    ):
        """
        The authors' beam search (models/beam_search/beam_search.py, §8b), all images at once: step 1 takes the top
        k words of one beam; afterwards the k * V candidates of each image are sorted and the first k kept. Scores are
        raw sums of log-probabilities (no length penalty). A beam whose last word is `<eos>` stays among the k: its
        only candidate is token 0 at its unchanged score (the others get -999), so better unfinished beams can push it
        out. Exactly `max_new_tokens` steps run (the authors' 20); the k beams are finally sorted by score. Generated
        `<pad>` tokens are masked, as the authors' stateful decoder does.

        Called by `generate(..., custom_generate=hfcap.reference_beam_search)` after the usual input preparation, so
        `encoder_outputs` arrive repeated `max(num_beams, num_return_sequences)` times per image. Returns the
        `num_return_sequences` best per image, cut after `<eos>` and padded with `pad_token_id`.
        """
        if logits_processor:
            raise ValueError(
                "The reference beam search reproduces the authors' and applies no logits processors; drop "
                f"{[type(processor).__name__ for processor in logits_processor]} or use the standard beam search."
            )
        beam_size = generation_config.num_beams
        if not 1 <= beam_size <= self.config.vocab_size:
            raise ValueError(f"`num_beams` must lie in [1, vocab_size={self.config.vocab_size}], got {beam_size}.")
        num_return_sequences = generation_config.num_return_sequences  # `generate` checked it is <= num_beams
        expand_size = max(beam_size, num_return_sequences)
        start_ids = input_ids[::expand_size]
        if start_ids.shape[1] != 1:
            raise ValueError("The reference beam search starts from `<bos>` alone: it takes no decoder prompt.")
        max_new_tokens = generation_config.max_new_tokens or generation_config.max_length - 1
        eos_token_ids = torch.tensor(generation_config.eos_token_id, device=input_ids.device).flatten()
        pad_token_id = self.config.pad_token_id
        output_attentions = generation_config.output_attentions
        encoder_outputs = model_kwargs["encoder_outputs"]
        levels = encoder_outputs.last_hidden_state[::expand_size]
        visual_mask = encoder_outputs.get("attention_mask")
        visual_mask = visual_mask[::expand_size] if visual_mask is not None else None

        batch_size = start_ids.shape[0]
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        sequences = start_ids  # (B * beams, 1 + t): beams = 1 before the first step, then k
        scores = levels.new_zeros(batch_size, 1, dtype=self.decoder.fc.weight.dtype)  # seq_logprob (B, beams)
        finished = torch.zeros(batch_size, 1, dtype=torch.bool, device=input_ids.device)  # seq_mask == 0
        attentions = None  # (B * beams, t, num_decoder_layers, L, H, N)
        for step in range(max_new_tokens):
            beams = scores.shape[1]
            outputs = self(
                encoder_outputs=M2TransformerEncoderOutput(last_hidden_state=levels, attention_mask=visual_mask),
                decoder_input_ids=sequences[:, -1:],
                decoder_attention_mask=sequences.ne(pad_token_id),
                cache=cache,
                use_cache=True,
                output_attentions=output_attentions,
                return_dict=True,
            )
            log_probs = outputs.logits[:, -1].log_softmax(dim=-1).view(batch_size, beams, -1)
            vocab_size = log_probs.shape[-1]
            candidates = scores.unsqueeze(-1) + log_probs
            if step > 0:
                finished = finished | torch.isin(sequences[:, -1], eos_token_ids).view(batch_size, beams)
                frozen = torch.full_like(candidates, -999.0)
                frozen[..., 0] = scores  # a finished beam can only go on with token 0 at its score
                candidates = torch.where(finished.unsqueeze(-1), frozen, candidates)
            # the authors sort every candidate (torch.sort, not topk) and keep the first k
            top_scores, top_indices = torch.sort(candidates.view(batch_size, -1), dim=-1, descending=True)
            top_scores, top_indices = top_scores[:, :beam_size], top_indices[:, :beam_size]
            beam_indices = top_indices // vocab_size
            words = top_indices % vocab_size
            rows = (torch.arange(batch_size, device=words.device).unsqueeze(1) * beams + beam_indices).flatten()

            cache.reorder_cache(rows)
            levels = levels.index_select(0, rows)
            visual_mask = visual_mask.index_select(0, rows) if visual_mask is not None else None
            finished = finished.gather(1, beam_indices)
            scores = top_scores
            sequences = torch.cat([sequences.index_select(0, rows), words.view(-1, 1)], dim=1)
            if output_attentions:
                step_attentions = torch.stack(outputs.cross_attentions, dim=1)[..., -1, :].unsqueeze(1)
                attentions = step_attentions if attentions is None else torch.cat([attentions, step_attentions], 1)
                attentions = attentions.index_select(0, rows)

        scores, order = torch.sort(scores, dim=1, descending=True)
        best = (torch.arange(batch_size, device=order.device).unsqueeze(1) * beam_size + order)
        best = best[:, :num_return_sequences].flatten()
        return self._pack_reference_hypotheses(
            sequences.index_select(0, best),
            scores[:, :num_return_sequences].flatten(),
            attentions.index_select(0, best) if attentions is not None else None,
            eos_token_ids,
            generation_config,
        )

    def _pack_reference_hypotheses(self, sequences, scores, attentions, eos_token_ids, generation_config):
        """Cut the hypotheses after their first `<eos>` (padding with `pad_token_id`) and build the output."""
        generated = sequences[:, 1:]
        is_eos = torch.isin(generated, eos_token_ids)
        after_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
        sequences = torch.cat([sequences[:, :1], generated.masked_fill(after_eos, self.config.pad_token_id)], dim=1)
        length = 1 + int((~after_eos).sum(dim=1).max())
        sequences = sequences[:, :length]
        if not generation_config.return_dict_in_generate:
            return sequences
        cross_attentions = None
        if attentions is not None:
            attentions = attentions[:, : length - 1].masked_fill(after_eos[:, : length - 1, None, None, None, None], 0)
            # (B * R, T, layers, L, H, N) -> one (B * R, L, H, T, N) per decoder layer
            cross_attentions = tuple(
                attentions[:, :, layer].permute(0, 2, 3, 1, 4) for layer in range(attentions.shape[2])
            )
        return M2TransformerBeamSearchOutput(
            sequences=sequences, sequences_scores=scores, cross_attentions=cross_attentions
        )


__all__ = [
    "GENERATION_DEFAULTS",
    "M2TransformerBeamSearchOutput",
    "M2TransformerEncoderOutput",
    "M2TransformerForConditionalGeneration",
    "M2TransformerPreTrainedModel",
    "M2TransformerSeq2SeqLMOutput",
    "remove_consecutive_duplicate_words",
]
