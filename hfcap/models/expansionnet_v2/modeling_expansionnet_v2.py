"""PyTorch ExpansionNet v2 (Hu, Cavicchioli and Capotondi, BigData 2023), as in jchenghu/ExpansionNet_v2.

Reading guide. Section numbers (§) refer to hfcap's specification of the authors' code (specs/expansionnet_v2.md,
restating models/layers.py, models/End_ExpansionNet_v2.py and models/captioning_model.py): §1 data flow (backbone ->
input projection -> encoder -> decoder -> vocabulary) and init, §2 static expansion (encoder) steps 1-6, §3 dynamic
expansion (decoder) steps 1-5 and its exact incremental form, §4 layer order, pre-LN and the five dropouts, §5 the
cross-layer combination, §8 the authors' beam search. With the default config this module computes what
`End_ExpansionNet_v2` computes; the authors recompute the whole decoder prefix at every step, the cache here gives the
same logits in O(E L d) per step and layer.

Shapes: B batch, T new decoder steps, P cached steps before them, L = P + T, N visual tokens, D visual_feature_dim,
d d_model, H num_heads, M = sum(static_expansion_groups), G its number of groups, E num_dynamic_expansions,
V vocab_size, K beams, R returned sequences per image, C the positions of a static decoder cache.
"""

import math
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import Seq2SeqLMOutput
from transformers.utils import ModelOutput

from .configuration_expansionnet_v2 import ExpansionNetV2Config

GENERATION_DEFAULTS = {"num_beams": 5, "max_new_tokens": 73}
"""The authors' test.py/demo.py decoding: beam 5, sequences of at most max_seq_len = 74 tokens including SOS (73 new
tokens; `__init__` lowers it to `max_position_embeddings - 1` for smaller position tables)."""

MASK_FILL = -1e4
"""The authors fill masked cross-attention scores with -1e4, not -inf (§4): fully masked rows attend uniformly."""


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
class ExpansionNetV2EncoderOutput(ModelOutput):
    """
    The encoder's output (§1 steps 1-3).

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(B, N, d)`): LN(x_N + Linear(cat[x_1..x_N])), what every
            decoder layer attends to.
        attention_mask (`torch.LongTensor` of shape `(B, N)`, *optional*): 1 = real visual token (only for padded
            `visual_features`).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): with `output_hidden_states`, the projected visual
            tokens x_0 and the output x_l of every encoder layer, each `(B, N, d)`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    attention_mask: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ExpansionNetV2Seq2SeqLMOutput(Seq2SeqLMOutput):
    """
    [`Seq2SeqLMOutput`] of ExpansionNet v2.

    Args:
        loss (`torch.FloatTensor` of shape `()`): token cross-entropy, mean over the labels that are not -100.
        logits (`torch.FloatTensor` of shape `(B, T, V)`): next-token scores before softmax.
        cache ([`ExpansionNetV2DecoderState`]): the decoder state after the last step, with `use_cache=True`
            (field `past_key_values` before transformers 5.25).
        decoder_hidden_states (`tuple(torch.FloatTensor)`): the scaled word + position embeddings and the output of
            every decoder layer, each `(B, T, d)`.
        cross_attentions (`tuple(torch.FloatTensor)`): one `(B, H, T, N)` tensor per decoder layer, the
            cross-attention weights over the N visual tokens.
        encoder_last_hidden_state (`torch.FloatTensor` of shape `(B, N, d)`): the encoder output.
        encoder_hidden_states (`tuple(torch.FloatTensor)`): see [`ExpansionNetV2EncoderOutput`].
    """


@dataclass
class ExpansionNetV2BeamSearchOutput(ModelOutput):
    """
    Result of the authors' beam search (`custom_generate=hfcap.reference_beam_search`, `return_dict_in_generate=True`).

    Args:
        sequences (`torch.LongTensor` of shape `(B * R, L)`): `SOS ... EOS` (no EOS when cut at the maximum length),
            right-padded with `pad_token_id`; R = `num_return_sequences` per image, best first.
        sequences_scores (`torch.FloatTensor` of shape `(B * R,)`): the score they rank by, the summed token
            log-probabilities divided by the length counting SOS and EOS.
        token_log_probs (`torch.FloatTensor` of shape `(B * R, L)`): each token's log-probability (0 for SOS and
            after the end), the second value their `beam_search` returns.
    """

    sequences: torch.LongTensor | None = None
    sequences_scores: torch.FloatTensor | None = None
    token_log_probs: torch.FloatTensor | None = None


DECODER_CACHE_NAMES = (
    "keys", "class_a", "class_b", "queries", "expansions_a", "expansions_b", "cross_keys", "cross_values"
)
"""The cache of §3 "incremental decoding" that each decoder layer keeps for the L positions seen so far, under
`"{layer}.{name}"` in the [`ExpansionNetV2DecoderState`]: `keys`, `class_a`, `class_b` (B, L, d) are K_j,
A_j = W_a x_j + b_a and B_j = W_b x_j + b_b of the dynamic expansion; `queries` (B, E L, d) the expanded queries
Q[(j, e)]; `expansions_a`, `expansions_b` (B, E L, d) the forward outputs plus the expanded bias, Ea + Bias and
Eb + Bias; `cross_keys`, `cross_values` (B, H, N, d / H) the cross-attention's projections of the encoder output
(constant). The state also holds `key_mask` (B, L), False for padding positions (never attended), and
`position_offset` (B,), the leading padding of the prompt (token i sits at row i - offset of the position table)."""


# Copied from hfcap.models.show_attend_tell.modeling_show_attend_tell.ShowAttendTellDecoderState with ShowAttendTell->ExpansionNetV2
class ExpansionNetV2DecoderState:
    """
    The decoder's state between decoding steps, which `generate` carries as the cache: named tensors with the batch
    first (what each holds is the decoder's business) and the number of tokens consumed. `static` names the tensors
    that are the same for every beam of an image (e.g. projections of the image features): beam search only ever
    reorders an image's own beams, so `reorder_cache` leaves them alone instead of copying them every step. Registered
    as a pytree node, so that `torch.export` can take and return it.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, tensors: dict, seq_length: int = 0, static=()):
        self.tensors = dict(tensors)
        self.seq_length = seq_length
        self.static = frozenset(static)

    def __getitem__(self, name):
        return self.tensors[name]

    def get_seq_length(self, layer_idx=0):
        return self.seq_length

    def batch_select_indices(self, indices):
        """Keeps (and reorders) the batch rows `indices`, in place."""
        self.tensors = {name: value.index_select(0, indices.to(value.device)) for name, value in self.tensors.items()}

    def reorder_cache(self, beam_idx):
        """Called by beam search after each step: row i continues from row `beam_idx[i]`, a beam of the same image."""
        self.tensors = {name: value if name in self.static else value.index_select(0, beam_idx.to(value.device))
                        for name, value in self.tensors.items()}

    def batch_repeat_interleave(self, repeats):
        """Repeats every batch row `repeats` times, in place (e.g. several continuations of one prefix)."""
        self.tensors = {name: value.repeat_interleave(repeats, dim=0) for name, value in self.tensors.items()}

    def tree_flatten(self):
        """As a pytree node: the tensors, and the context to rebuild the state around them."""
        return list(self.tensors.values()), (list(self.tensors), self.seq_length, sorted(self.static))

    def tree_flatten_with_keys(self):
        values, context = self.tree_flatten()
        return [(_pytree.MappingKey(name), value) for name, value in zip(context[0], values)], context

    @classmethod
    def tree_unflatten(cls, values, context):
        names, seq_length, static = context
        return cls(dict(zip(names, values)), seq_length, static)


_pytree.register_pytree_node(
    ExpansionNetV2DecoderState,
    ExpansionNetV2DecoderState.tree_flatten,
    ExpansionNetV2DecoderState.tree_unflatten,
    serialized_type_name=f"{__name__}.ExpansionNetV2DecoderState",
    flatten_with_keys_fn=ExpansionNetV2DecoderState.tree_flatten_with_keys,
)


class ExpansionNetV2StaticDecoderState:
    """
    The decoder state in preallocated buffers of `capacity` positions, for `generate(...,
    cache_implementation="static")`: the tensors of [`ExpansionNetV2DecoderState`] (per-position ones as (B, C, d),
    the expanded rows as (B, C, E, d)) plus `cross_mask` (B, N), written in place, so that every decoding step has
    the same shapes and buffer addresses. On CUDA (no autograd, no autocast, eval mode) the step is then captured as
    a CUDA graph at its first run and replayed after: one launch instead of the ~1,400 small kernels that bound an
    eager step. The model keeps the state between `generate` calls with the same capacity, so a later call of the
    same shapes reuses the buffers and the graph; a deep copy starts empty.
    """

    is_compileable = False  # transformers must not wrap it in torch.compile: the graph is captured here
    is_croppable = False
    PER_POSITION = frozenset({"keys", "class_a", "class_b", "key_mask"})  # (B, C, ...)
    PER_EXPANDED_ROW = frozenset({"queries", "expansions_a", "expansions_b"})  # (B, C, E, d)

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.seq_length = 0
        self.tensors = {}
        self.static = frozenset()
        self.position = None  # p, a (1,) device tensor that the step reads
        self.weights = None  # data pointers of the decoder's weights, which a captured graph reads
        self.graph = self.graph_inputs = self.graph_outputs = None

    def __getitem__(self, name):
        return self.tensors[name]

    def __deepcopy__(self, memo):
        return type(self)(self.capacity)

    def get_seq_length(self, layer_idx=0):
        return self.seq_length

    def load(self, prompt_state: ExpansionNetV2DecoderState, cross_mask, weights):
        """
        Starts from the cache of a prompt of P positions: copies it into the buffers (allocated anew, dropping the
        graph, when names, shapes, dtypes, device or the decoder's `weights` changed since the last call) and zeroes
        the positions after it: `key_mask` is then False after the last written position (the step's causal mask),
        and no masked position brings a stale inf or NaN into a product.
        """
        length = prompt_state.seq_length
        if length > self.capacity:
            raise ValueError(f"The decoder prompt has {length} tokens, more than the static cache's capacity of "
                             f"{self.capacity} positions.")
        tensors = {**prompt_state.tensors, "cross_mask": cross_mask}
        shapes = {}
        for name, value in tensors.items():
            kind = name.rpartition(".")[2]
            if kind in self.PER_POSITION:
                shapes[name] = (value.shape[0], self.capacity, *value.shape[2:])
            elif kind in self.PER_EXPANDED_ROW:
                shapes[name] = (value.shape[0], self.capacity, value.shape[1] // length, value.shape[2])
            else:
                shapes[name] = tuple(value.shape)
        # buffers made under `torch.inference_mode` cannot be written outside it, and the reverse
        inference = torch.is_inference_mode_enabled()
        layout = {name: (shapes[name], value.dtype, value.device, inference) for name, value in tensors.items()}
        current = {name: (tuple(value.shape), value.dtype, value.device, value.is_inference())
                   for name, value in self.tensors.items()}
        if layout != current or weights != self.weights:
            self.tensors = {name: torch.zeros(shape, dtype=dtype, device=device)
                            for name, (shape, dtype, device, _) in layout.items()}
            self.position = torch.zeros(1, dtype=torch.long, device=cross_mask.device)
            self.weights, self.graph = weights, None
        for name, value in tensors.items():
            buffer = self.tensors[name]
            if name.rpartition(".")[2] in self.PER_POSITION | self.PER_EXPANDED_ROW:
                buffer[:, :length].copy_(value.view(buffer[:, :length].shape))
                buffer[:, length:].zero_()
            else:
                buffer.copy_(value)
        self.static = prompt_state.static | {"cross_mask"}
        self.seq_length = length

    def run_step(self, step, inputs, capture):
        """
        `step(*inputs, self)` at position `seq_length`, which must touch no tensors but `inputs`, the state's and
        the module's: eagerly, or with `capture` (CUDA only) by replaying the graph captured at the first step. The
        graph's outputs are copied out, since the next replay overwrites them.
        """
        self.position.fill_(self.seq_length)
        if not capture:
            return step(*inputs, self)
        if self.graph is None:
            self.graph_inputs = [value.clone() for value in inputs]
            stream = torch.cuda.Stream(self.position.device)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up before capture; it writes at p what the step writes anyway
                step(*self.graph_inputs, self)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.graph_outputs = step(*self.graph_inputs, self)
        for captured, value in zip(self.graph_inputs, inputs):
            captured.copy_(value)
        self.graph.replay()
        return _pytree.tree_map(torch.clone, self.graph_outputs)

    def reorder_cache(self, beam_idx):
        """Beam search: row i continues from row `beam_idx[i]` (a beam of the same image), copied in place over the
        filled positions."""
        beam_idx = beam_idx.to(self.position.device)
        for name, value in self.tensors.items():
            if name in self.static:
                continue
            filled = value if value.ndim == 1 else value[:, : self.seq_length]
            filled.copy_(filled.index_select(0, beam_idx))

    def batch_select_indices(self, indices):
        """Keeps (and reorders) the batch rows `indices`, in new buffers (the graph is captured again)."""
        self.tensors = {name: value.index_select(0, indices.to(value.device)) for name, value in self.tensors.items()}
        self.graph = None

    def batch_repeat_interleave(self, repeats):
        """Repeats every batch row `repeats` times, in new buffers (the graph is captured again)."""
        self.tensors = {name: value.repeat_interleave(repeats, dim=0) for name, value in self.tensors.items()}
        self.graph = None


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


def _normalise(weights, mask, eps):
    """Zero the masked weights, then divide each row by its sum + eps (the authors' normalisation, §2.3, §3.3)."""
    if mask is not None:
        weights = weights.masked_fill(~mask, 0.0)
    return weights / (weights.sum(dim=-1, keepdim=True) + eps)


class ExpansionNetV2FeedForward(nn.Module):
    """`Linear(d -> d_ff) -> ReLU -> Dropout -> Linear(d_ff -> d)` (§4)."""

    def __init__(self, config: ExpansionNetV2Config, dropout: float):
        super().__init__()
        self.linear_1 = nn.Linear(config.d_model, config.d_ff)
        self.dropout = nn.Dropout(dropout)
        self.linear_2 = nn.Linear(config.d_ff, config.d_model)

    def forward(self, x):
        return self.linear_2(self.dropout(F.relu(self.linear_1(x))))


class ExpansionNetV2StaticExpansion(nn.Module):
    """
    Static expansion (§2, the authors' `StaticExpansionBlock`): N tokens are mixed into M learned expansion rows and
    back, separately for positive and negative scores, with a learned gate choosing between the two.
    """

    def __init__(self, config: ExpansionNetV2Config):
        super().__init__()
        d, num_rows = config.d_model, sum(config.static_expansion_groups)
        self.group_sizes = list(config.static_expansion_groups)
        self.eps = config.expansion_eps
        self.query_exp_vectors = nn.Embedding(num_rows, d)
        self.bias_exp_vectors = nn.Embedding(num_rows, d)
        self.key_embed = nn.Linear(d, d)
        self.class_a_embed = nn.Linear(d, d)
        self.class_b_embed = nn.Linear(d, d)
        self.selector_embed = nn.Linear(d, d)
        self.score_dropout = nn.Dropout(config.dropout_enc)
        self.forward_dropout_a = nn.Dropout(config.dropout_enc)
        self.forward_dropout_b = nn.Dropout(config.dropout_enc)
        self.backward_dropout_a = nn.Dropout(config.dropout_enc)
        self.backward_dropout_b = nn.Dropout(config.dropout_enc)

    def forward(self, x, token_mask=None):
        """
        Args:
            x (`torch.FloatTensor` of shape `(B, N, d)`): LN_1 of the layer input.
            token_mask (`torch.BoolTensor` of shape `(B, N)`, *optional*): False = padding token.

        Returns:
            `torch.FloatTensor` of shape `(B, N, d)`.
        """
        batch_size, _, d = x.shape
        queries = self.query_exp_vectors.weight.expand(batch_size, -1, -1)  # (B, M, d)
        scores = torch.matmul(queries, self.key_embed(x).transpose(-1, -2)) / d**0.5  # §2.1 Z = Q_e K^T / sqrt(d)
        scores = self.score_dropout(scores)
        column_mask = token_mask[:, None, :] if token_mask is not None else None
        forward_a = _normalise(F.relu(scores), column_mask, self.eps)  # §2.2-3 sign split, normalised over N
        forward_b = _normalise(F.relu(-scores), column_mask, self.eps)
        bias = self.bias_exp_vectors.weight  # Bias_e, added before the forward dropout (§2.4)
        expansion_a = self.forward_dropout_a(torch.matmul(forward_a, self.class_a_embed(x)) + bias)  # §2.4 Ea
        expansion_b = self.forward_dropout_b(torch.matmul(forward_b, self.class_b_embed(x)) + bias)  # §2.4 Eb
        backward_a = self._normalise_per_group(F.relu(scores.transpose(-2, -1)))  # §2.5 Pa', unmasked
        backward_b = self._normalise_per_group(F.relu(-scores.transpose(-2, -1)))
        num_groups = len(self.group_sizes)
        output_a = self.backward_dropout_a(torch.matmul(backward_a, expansion_a) / num_groups)  # §2.5 Oa
        output_b = self.backward_dropout_b(torch.matmul(backward_b, expansion_b) / num_groups)  # §2.5 Ob
        selector = torch.sigmoid(self.selector_embed(x))  # §2.6 S
        return selector * output_a + (1 - selector) * output_b

    def _normalise_per_group(self, weights):
        """`(B, N, M)`: each group's column slice divided by its own row sum + eps (issue #17: groups are separate)."""
        groups = torch.split(weights, self.group_sizes, dim=-1)
        return torch.cat([_normalise(group, None, self.eps) for group in groups], dim=-1)


class ExpansionNetV2DynamicExpansion(nn.Module):
    """
    Dynamic expansion (§3, the authors' `DynamicExpansionBlock`): every position i spawns E rows (learned vectors plus
    a projection of x_i); rows read the tokens j <= i (forward), and output i reads the rows of positions j <= i
    (backward). Both directions are causal, so the cache of §3 gives exactly the full recomputation's values.
    """

    def __init__(self, config: ExpansionNetV2Config):
        super().__init__()
        d = config.d_model
        self.num_expansions = config.num_dynamic_expansions
        self.eps = config.expansion_eps
        self.cond_embed = nn.Linear(d, d)
        self.query_exp_vectors = nn.Embedding(self.num_expansions, d)
        self.bias_exp_vectors = nn.Embedding(self.num_expansions, d)
        self.key_linear = nn.Linear(d, d)
        self.class_a_embed = nn.Linear(d, d)
        self.class_b_embed = nn.Linear(d, d)
        self.selector_embed = nn.Linear(d, d)
        self.score_dropout = nn.Dropout(config.dropout_dec)
        self.forward_dropout_a = nn.Dropout(config.dropout_dec)
        self.forward_dropout_b = nn.Dropout(config.dropout_dec)
        self.backward_dropout_a = nn.Dropout(config.dropout_dec)
        self.backward_dropout_b = nn.Dropout(config.dropout_dec)

    def forward(self, x, attention_mask, past=None):
        """
        Args:
            x (`torch.FloatTensor` of shape `(B, T, d)`): LN_1 of the layer input at the T new positions.
            attention_mask (`torch.BoolTensor` of shape `(B, T, L)`): M[i, j] = 1[j <= i], zero for padding rows and
                columns (the authors' `create_no_peak_and_pad_mask`).
            past (`dict[str, torch.Tensor]`, *optional*): this layer's cache for the P earlier positions.

        Returns:
            `(output (B, T, d), cache)`: the cache holds the tensors of [`ExpansionNetV2DecoderState`] for all L
            positions (without the cross-attention ones).
        """
        batch_size, num_new, d = x.shape
        num_rows = num_new * self.num_expansions
        condition = self.cond_embed(x).unsqueeze(2)  # §3.1 C_i, (B, T, 1, d)
        queries = (self.query_exp_vectors.weight + condition).reshape(batch_size, num_rows, d)  # Q[(i,e)] = q_e + C_i
        biases = (self.bias_exp_vectors.weight + condition).reshape(batch_size, num_rows, d)  # Bias[(i,e)] = b_e + C_i
        cache = {"keys": self.key_linear(x), "class_a": self.class_a_embed(x), "class_b": self.class_b_embed(x)}
        if past is not None:
            cache = {name: torch.cat([past[name], tensor], dim=1) for name, tensor in cache.items()}

        # §3.2 Z[(i,e), j] = Q[(i,e)] K_j / sqrt(d) for the new rows against all L keys
        row_scores = self.score_dropout(torch.matmul(queries, cache["keys"].transpose(-1, -2)) / d**0.5)
        row_mask = attention_mask.repeat_interleave(self.num_expansions, dim=1)  # (B, E T, L)
        forward_a = _normalise(F.relu(row_scores), row_mask, self.eps)  # §3.3 forward, over j <= i
        forward_b = _normalise(F.relu(-row_scores), row_mask, self.eps)
        expansions_a = self.forward_dropout_a(torch.matmul(forward_a, cache["class_a"])) + biases  # Ea + Bias
        expansions_b = self.forward_dropout_b(torch.matmul(forward_b, cache["class_b"])) + biases  # Eb + Bias
        new_rows = {"queries": queries, "expansions_a": expansions_a, "expansions_b": expansions_b}

        # §3.4 backward: output i mixes the rows (j, e), j <= i, by their scores Z[(j,e), i] against the new keys
        column_scores = row_scores[:, :, -num_new:]  # the new rows against the new keys
        if past is not None:
            past_scores = torch.matmul(past["queries"], cache["keys"][:, -num_new:].transpose(-1, -2)) / d**0.5
            column_scores = torch.cat([self.score_dropout(past_scores), column_scores], dim=1)  # (B, E L, T)
            new_rows = {name: torch.cat([past[name], tensor], dim=1) for name, tensor in new_rows.items()}
        cache.update(new_rows)
        column_scores = column_scores.transpose(-2, -1)  # (B, T, E L)
        column_mask = attention_mask.repeat_interleave(self.num_expansions, dim=2)  # (B, T, E L)
        backward_a = _normalise(F.relu(column_scores), column_mask, self.eps)
        backward_b = _normalise(F.relu(-column_scores), column_mask, self.eps)
        output_a = self.backward_dropout_a(torch.matmul(backward_a, cache["expansions_a"]))  # §3.4 Oa
        output_b = self.backward_dropout_b(torch.matmul(backward_b, cache["expansions_b"]))  # §3.4 Ob
        selector = torch.sigmoid(self.selector_embed(x))  # §3.5 gate
        return selector * output_a + (1 - selector) * output_b, cache

    def step_in_place(self, x, step_mask, buffers, position):
        """
        One new position p (T = 1) on the static cache of C positions (the same values as `forward` with a cache of
        p positions): the new rows are written into `buffers` at p, and every product runs over all C positions with
        `step_mask` zeroing those after p, so the shapes never change.

        Args:
            x (`torch.FloatTensor` of shape `(B, 1, d)`): LN_1 of the layer input at position p.
            step_mask (`torch.BoolTensor` of shape `(B, 1, C)`): 1[j <= p], zero for padding positions and for every
                j when p itself is padding.
            buffers (`dict[str, torch.Tensor]`): this layer's `keys`, `class_a`, `class_b` (B, C, d) and `queries`,
                `expansions_a`, `expansions_b` (B, C, E, d), filled up to p - 1.
            position (`torch.LongTensor` of shape `(1,)`): p, on the device (so that a CUDA graph can replay the step).

        Returns:
            `torch.FloatTensor` of shape `(B, 1, d)`.
        """
        d = x.shape[-1]
        condition = self.cond_embed(x)  # §3.1 C_p, (B, 1, d)
        queries = self.query_exp_vectors.weight + condition  # Q[(p,e)] = q_e + C_p, (B, E, d)
        biases = self.bias_exp_vectors.weight + condition  # Bias[(p,e)] = b_e + C_p
        key = self.key_linear(x)
        for name, value in (("keys", key), ("class_a", self.class_a_embed(x)), ("class_b", self.class_b_embed(x)),
                            ("queries", queries[:, None])):
            buffers[name].index_copy_(1, position, value)

        # §3.2-3 forward: the new rows against all C keys, normalised over j <= p
        row_scores = self.score_dropout(torch.matmul(queries, buffers["keys"].transpose(-1, -2)) / d**0.5)
        forward_a = _normalise(F.relu(row_scores), step_mask, self.eps)
        forward_b = _normalise(F.relu(-row_scores), step_mask, self.eps)
        expansions_a = self.forward_dropout_a(torch.matmul(forward_a, buffers["class_a"])) + biases  # Ea + Bias
        expansions_b = self.forward_dropout_b(torch.matmul(forward_b, buffers["class_b"])) + biases  # Eb + Bias
        buffers["expansions_a"].index_copy_(1, position, expansions_a[:, None])
        buffers["expansions_b"].index_copy_(1, position, expansions_b[:, None])

        # §3.4 backward: output p mixes the rows (j, e), j <= p, by their scores Z[(j,e), p] against the new key
        rows = buffers["queries"].flatten(1, 2)  # (B, C E, d), row (j, e) at j E + e
        column_scores = self.score_dropout(torch.matmul(key, rows.transpose(-1, -2)) / d**0.5)  # (B, 1, C E)
        column_mask = step_mask[..., None].expand(-1, -1, -1, self.num_expansions).flatten(2)  # (B, 1, C E)
        backward_a = _normalise(F.relu(column_scores), column_mask, self.eps)
        backward_b = _normalise(F.relu(-column_scores), column_mask, self.eps)
        output_a = self.backward_dropout_a(torch.matmul(backward_a, buffers["expansions_a"].flatten(1, 2)))  # §3.4 Oa
        output_b = self.backward_dropout_b(torch.matmul(backward_b, buffers["expansions_b"].flatten(1, 2)))  # §3.4 Ob
        selector = torch.sigmoid(self.selector_embed(x))  # §3.5 gate
        return selector * output_a + (1 - selector) * output_b


class ExpansionNetV2CrossAttention(nn.Module):
    """Multi-head attention of the decoder over the encoder output (§4 MHA): no dropout on the weights, masks -1e4."""

    def __init__(self, config: ExpansionNetV2Config):
        super().__init__()
        d = config.d_model
        self.num_heads = config.num_heads
        self.head_dim = d // config.num_heads
        self.Wq = nn.Linear(d, d)
        self.Wk = nn.Linear(d, d)
        self.Wv = nn.Linear(d, d)
        self.out_linear = nn.Linear(d, d)

    def project_keys_values(self, encoder_hidden_states):
        """`(B, N, d)` -> keys and values `(B, H, N, d / H)`, computed once per generation."""
        batch_size, num_tokens, _ = encoder_hidden_states.shape
        keys = self.Wk(encoder_hidden_states).view(batch_size, num_tokens, self.num_heads, self.head_dim)
        values = self.Wv(encoder_hidden_states).view(batch_size, num_tokens, self.num_heads, self.head_dim)
        return keys.transpose(1, 2), values.transpose(1, 2)

    def forward(self, x, keys, values, attention_mask):
        """
        Args:
            x (`torch.FloatTensor` of shape `(B, T, d)`): LN_2 of the layer input.
            keys, values (`torch.FloatTensor` of shape `(B, H, N, d / H)`): from `project_keys_values`.
            attention_mask (`torch.BoolTensor` of shape `(B, T, N)`): False = masked (score -1e4).

        Returns:
            `(output (B, T, d), weights (B, H, T, N))`.
        """
        batch_size, num_new, d = x.shape
        queries = self.Wq(x).view(batch_size, num_new, self.num_heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(queries, keys.transpose(-1, -2)) / self.head_dim**0.5
        scores = scores.masked_fill(~attention_mask[:, None], MASK_FILL)
        weights = scores.softmax(dim=-1)
        attended = torch.matmul(weights, values).transpose(1, 2).reshape(batch_size, num_new, d)
        return self.out_linear(attended), weights


class ExpansionNetV2EncoderLayer(nn.Module):
    """Pre-LN encoder layer (§4): `x += Drop(StaticExp(LN_1 x))`, `x += Drop(FF(LN_2 x))`."""

    def __init__(self, config: ExpansionNetV2Config):
        super().__init__()
        self.norm_1 = nn.LayerNorm(config.d_model)
        self.stc_exp = ExpansionNetV2StaticExpansion(config)
        self.dropout_1 = nn.Dropout(config.dropout_enc)
        self.norm_2 = nn.LayerNorm(config.d_model)
        self.ff = ExpansionNetV2FeedForward(config, config.dropout_enc)
        self.dropout_2 = nn.Dropout(config.dropout_enc)

    def forward(self, x, token_mask=None):
        x = x + self.dropout_1(self.stc_exp(self.norm_1(x), token_mask))
        return x + self.dropout_2(self.ff(self.norm_2(x)))


class ExpansionNetV2DecoderLayer(nn.Module):
    """Pre-LN decoder layer (§4), no self-attention: dynamic expansion, cross-attention, feed-forward."""

    def __init__(self, config: ExpansionNetV2Config):
        super().__init__()
        self.norm_1 = nn.LayerNorm(config.d_model)
        self.dyn_exp = ExpansionNetV2DynamicExpansion(config)
        self.dropout_1 = nn.Dropout(config.dropout_dec)
        self.norm_2 = nn.LayerNorm(config.d_model)
        self.mha = ExpansionNetV2CrossAttention(config)
        self.dropout_2 = nn.Dropout(config.dropout_dec)
        self.norm_3 = nn.LayerNorm(config.d_model)
        self.ff = ExpansionNetV2FeedForward(config, config.dropout_dec)
        self.dropout_3 = nn.Dropout(config.dropout_dec)

    def forward(self, y, expansion_mask, cross_keys, cross_values, cross_mask, past=None, position=None):
        """`y (B, T, d)` -> `(y, cross-attention weights (B, H, T, N), this layer's cache)`. With `position` (a
        static cache's step, T = 1), `past` holds the static buffers, which the step writes at `position`, and the
        returned cache is None."""
        if position is None:
            expanded, cache = self.dyn_exp(self.norm_1(y), expansion_mask, past)
        else:
            expanded, cache = self.dyn_exp.step_in_place(self.norm_1(y), expansion_mask, past, position), None
        y = y + self.dropout_1(expanded)  # §4 step 1
        attended, weights = self.mha(self.norm_2(y), cross_keys, cross_values, cross_mask)
        y = y + self.dropout_2(attended)  # §4 step 2
        y = y + self.dropout_3(self.ff(self.norm_3(y)))  # §4 step 3
        return y, weights, cache


class ExpansionNetV2Encoder(nn.Module):
    """
    Backbone stage + encoder (§1 steps 1-3): the timm backbone's final tokens (Swin: the normalised 12x12 map,
    row-major), `Linear(D -> d)`, N_enc static-expansion layers and the cross-layer combination. No positional
    encoding is added to the visual tokens. Precomputed `visual_features (B, N, D)` bypass the backbone.
    """

    main_input_name = "pixel_values"

    def __init__(self, config: ExpansionNetV2Config):
        super().__init__()
        self.config = config
        self.num_channels = (config.backbone_kwargs or {}).get("in_chans", 3)
        self.backbone = None
        if config.use_backbone:
            self.backbone = create_timm_backbone(config, num_classes=0)
            if self.backbone.num_features != config.visual_feature_dim:
                raise ValueError(
                    f"Backbone {config.backbone!r} outputs {self.backbone.num_features} features per token but "
                    f"`visual_feature_dim={config.visual_feature_dim}`; set "
                    f"`visual_feature_dim={self.backbone.num_features}`."
                )
        self.input_linear = nn.Linear(config.visual_feature_dim, config.d_model)
        self.input_dropout = nn.Dropout(config.dropout_enc_input)
        self.layers = nn.ModuleList([ExpansionNetV2EncoderLayer(config) for _ in range(config.num_encoder_layers)])
        self.reduce_group = nn.Linear(config.d_model * config.num_encoder_layers, config.d_model)
        self.reduce_dropout = nn.Dropout(config.dropout_other)
        self.reduce_norm = nn.LayerNorm(config.d_model)

    def forward_backbone(self, pixel_values):
        """The backbone stage on checked `pixel_values (B, C, H, W)`: the backbone's final tokens (Swin: its normalised
        map, row-major), `(B, N, D)`."""
        patch_embed = getattr(self.backbone, "patch_embed", None)
        # timm's Swin (strict_img_size) takes only the input size its windows and shift masks were built for
        if getattr(patch_embed, "strict_img_size", False) and tuple(pixel_values.shape[-2:]) != tuple(
            patch_embed.img_size
        ):
            size = "x".join(map(str, patch_embed.img_size))
            raise ValueError(f"`pixel_values` must be {size} px for backbone {self.config.backbone!r} (its windows "
                             f"are built for that size), got {tuple(pixel_values.shape)}.")
        features = self.backbone.forward_features(pixel_values)
        if features.ndim == 4:  # a feature map: Swin's is NHWC (after its final LayerNorm), CNNs' NCHW
            if getattr(self.backbone, "output_fmt", "NCHW") != "NHWC":
                features = features.permute(0, 2, 3, 1)
            features = features.flatten(1, 2)  # row-major over the grid, as the authors' (B, h*w, D)
        return features

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
            visual_features (`torch.FloatTensor` of shape `(B, N, D)`): precomputed backbone tokens instead.
            visual_attention_mask (`torch.LongTensor` of shape `(B, N)`, *optional*): 1 = real token (padded
                `visual_features` only).
            output_attentions: accepted for the `generate` interface; the encoder has no attention.
            output_hidden_states (`bool`, *optional*): also return x_0 .. x_N.

        Returns:
            [`ExpansionNetV2EncoderOutput`] (a tuple if `return_dict=False`).
        """
        check_visual_inputs(self.config, self.num_channels, pixel_values, visual_features, visual_attention_mask)
        if pixel_values is not None:
            visual_features = self.get_image_features(pixel_values)
        token_mask = visual_attention_mask.bool() if visual_attention_mask is not None else None
        x = self.input_dropout(self.input_linear(visual_features.to(self.input_linear.weight.dtype)))  # §1.1
        hidden_states = [x]
        for layer in self.layers:  # §1.2
            x = layer(x, token_mask)
            hidden_states.append(x)
        layer_outputs = torch.cat(hidden_states[1:], dim=-1)
        combined = self.reduce_norm(x + self.reduce_dropout(self.reduce_group(layer_outputs)))  # §1.3 and §5
        output = ExpansionNetV2EncoderOutput(
            last_hidden_state=combined,
            attention_mask=visual_attention_mask,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
        )
        return output if return_dict is not False else output.to_tuple()


class ExpansionNetV2Decoder(nn.Module):
    """
    The decoder (§1 steps 4-6 without the vocabulary projection): scaled word embeddings plus learned positions,
    N_dec dynamic-expansion layers and the cross-layer combination, optionally continuing from a cache.
    """

    def __init__(self, config: ExpansionNetV2Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.embed_dropout = nn.Dropout(config.dropout_dec_input)
        self.embed_scale = math.sqrt(float(config.d_model))
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.d_model)
        self.layers = nn.ModuleList([ExpansionNetV2DecoderLayer(config) for _ in range(config.num_decoder_layers)])
        self.reduce_group = nn.Linear(config.d_model * config.num_decoder_layers, config.d_model)
        self.reduce_dropout = nn.Dropout(config.dropout_other)
        self.reduce_norm = nn.LayerNorm(config.d_model)

    def forward(
        self,
        input_ids,
        encoder_hidden_states,
        encoder_attention_mask=None,
        attention_mask=None,
        state=None,
        use_cache=False,
        output_hidden_states=False,
    ):
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(B, T)`): the tokens at positions P .. L - 1.
            encoder_hidden_states (`torch.FloatTensor` of shape `(B, N, d)`): the encoder output.
            encoder_attention_mask (`torch.LongTensor` of shape `(B, N)`, *optional*): 1 = real visual token.
            attention_mask (`torch.LongTensor` of shape `(B, L')`, *optional*): by absolute position, 0 = padding
                (left padding of prompts, or the authors' right padding); positions >= L' count as 1. Padding
                positions are never attended, and their own rows are masked as in the authors' code.
            state ([`ExpansionNetV2DecoderState`], *optional*): the cache of the P earlier positions
                (`DECODER_CACHE_NAMES`).
            use_cache (`bool`): return the state after these T positions.
            output_hidden_states (`bool`): also return the embeddings and every layer's output.

        Returns:
            `(hidden (B, T, d), cross-attention weights per layer, hidden states or None, state or None)`.
        """
        if isinstance(state, ExpansionNetV2StaticDecoderState):
            return self.forward_static(
                input_ids, encoder_hidden_states, encoder_attention_mask, attention_mask, state, output_hidden_states
            )
        batch_size, num_new = input_ids.shape
        past_length = state.seq_length if state is not None else 0
        total_length = past_length + num_new
        new_mask = input_ids.new_ones((batch_size, num_new), dtype=torch.bool)
        if attention_mask is not None:
            known = attention_mask[:, past_length:total_length].bool()
            new_mask[:, : known.shape[1]] = known
        if state is None:
            position_offset = (new_mask.cumsum(dim=1) == 0).sum(dim=1)  # leading padding of a left-padded prompt
            key_mask = new_mask
        else:
            position_offset = state["position_offset"]
            key_mask = torch.cat([state["key_mask"], new_mask], dim=1)
        if total_length > self.config.max_position_embeddings:  # checked on the length, padding included
            raise ValueError(
                f"The decoder input is {total_length} tokens long (cache included), but the learned position table "
                f"has `max_position_embeddings={self.config.max_position_embeddings}` rows; shorten the input or "
                "`max_new_tokens`."
            )
        positions = torch.arange(past_length, total_length, device=input_ids.device) - position_offset[:, None]
        positions = positions.clamp(min=0)

        # §1.4 y_0 = Dropout(Emb(tok)) * sqrt(d) + PosEmb(position); dropout before the scaling, none on positions
        y = self.embed_dropout(self.embed_tokens(input_ids)) * self.embed_scale + self.embed_positions(positions)
        causal = torch.arange(total_length, device=input_ids.device)[None, :] <= torch.arange(
            past_length, total_length, device=input_ids.device
        )[:, None]
        expansion_mask = causal & key_mask[:, None, :] & new_mask[:, :, None]  # (B, T, L)
        cross_mask = new_mask[:, :, None].expand(-1, -1, encoder_hidden_states.shape[1])  # padding rows: all -1e4
        if encoder_attention_mask is not None:
            cross_mask = cross_mask & encoder_attention_mask.bool()[:, None, :]

        hidden_states = [y] if output_hidden_states else None
        layer_outputs, cross_attentions = [], []
        cache = {"key_mask": key_mask, "position_offset": position_offset}
        for index, layer in enumerate(self.layers):
            past = {name: state[f"{index}.{name}"] for name in DECODER_CACHE_NAMES} if state is not None else None
            if past is not None:
                cross_keys, cross_values = past["cross_keys"], past["cross_values"]
            else:
                cross_keys, cross_values = layer.mha.project_keys_values(encoder_hidden_states)
            y, weights, layer_cache = layer(y, expansion_mask, cross_keys, cross_values, cross_mask, past)
            layer_cache.update(cross_keys=cross_keys, cross_values=cross_values)
            cache.update({f"{index}.{name}": tensor for name, tensor in layer_cache.items()})
            layer_outputs.append(y)
            cross_attentions.append(weights)
            if output_hidden_states:
                hidden_states.append(y)
        y = self.reduce_norm(y + self.reduce_dropout(self.reduce_group(torch.cat(layer_outputs, dim=-1))))  # §5
        # The cross-attention projections are the image's, the same for all its beams: beam search need not reorder them.
        static = {f"{index}.{name}" for index in range(len(self.layers)) for name in ("cross_keys", "cross_values")}
        new_state = ExpansionNetV2DecoderState(cache, total_length, static) if use_cache else None
        return y, tuple(cross_attentions), tuple(hidden_states) if output_hidden_states else None, new_state

    def forward_static(
        self, input_ids, encoder_hidden_states, encoder_attention_mask, attention_mask, state, output_hidden_states
    ):
        """`forward` on an [`ExpansionNetV2StaticDecoderState`]: the prompt (the state is empty) runs as without a
        cache and fills the buffers; every later call takes one token per row (`step_static`), replayed as a CUDA
        graph where it can be. Same arguments and returns as `forward`; the state is updated in place."""
        if state.seq_length == 0:
            y, cross_attentions, hidden_states, prompt_state = self(
                input_ids, encoder_hidden_states, encoder_attention_mask, attention_mask, use_cache=True,
                output_hidden_states=output_hidden_states,
            )
            cross_mask = torch.ones(encoder_hidden_states.shape[:2], dtype=torch.bool, device=input_ids.device)
            if encoder_attention_mask is not None:
                cross_mask = encoder_attention_mask.bool()
            state.load(prompt_state, cross_mask, tuple(weight.data_ptr() for weight in self.parameters()))
            return y, cross_attentions, hidden_states, state
        batch_size, num_new = input_ids.shape
        position = state.seq_length
        if num_new != 1:
            raise ValueError(f"A static decoder cache continues one token per row at a time, got {num_new} tokens.")
        if position >= min(state.capacity, self.config.max_position_embeddings):
            table = self.config.max_position_embeddings
            raise ValueError(
                f"The decoder cannot take a token at position {position}: the static cache holds {state.capacity} "
                f"positions and the learned position table `max_position_embeddings={table}`."
            )
        new_mask = input_ids.new_ones((batch_size, 1), dtype=torch.bool)
        if attention_mask is not None and attention_mask.shape[1] > position:
            new_mask = attention_mask[:, position : position + 1].bool()
        capture = input_ids.is_cuda and not (
            self.training or torch.is_grad_enabled() or torch.is_autocast_enabled(input_ids.device.type)
        )
        y, cross_attentions, hidden_states = state.run_step(self.step_static, (input_ids, new_mask), capture)
        state.seq_length += 1
        return y, cross_attentions, hidden_states if output_hidden_states else None, state

    def step_static(self, input_ids, new_mask, state):
        """
        One token per row at position p = `state.position` (the same values as `forward` with a cache of p
        positions), in fixed shapes and without host synchronisation, so that a CUDA graph can capture it.

        Args:
            input_ids (`torch.LongTensor` of shape `(B, 1)`): the tokens at p.
            new_mask (`torch.BoolTensor` of shape `(B, 1)`): False where p is padding.
            state ([`ExpansionNetV2StaticDecoderState`]): filled up to p - 1; written at p.

        Returns:
            `(y (B, 1, d), cross-attention weights per layer, hidden states)`.
        """
        position, key_mask = state.position, state["key_mask"]
        key_mask.index_copy_(1, position, new_mask)
        step_mask = (key_mask & new_mask)[:, None, :]  # (B, 1, C): `load` zeroed key_mask after the prompt
        positions = (position - state["position_offset"][:, None]).clamp(min=0)  # (B, 1)
        # §1.4 y_0 = Dropout(Emb(tok)) * sqrt(d) + PosEmb(position)
        y = self.embed_dropout(self.embed_tokens(input_ids)) * self.embed_scale + self.embed_positions(positions)
        cross_mask = (new_mask & state["cross_mask"])[:, None, :]  # (B, 1, N)
        hidden_states, layer_outputs, cross_attentions = [y], [], []
        for index, layer in enumerate(self.layers):
            buffers = {name: state[f"{index}.{name}"] for name in DECODER_CACHE_NAMES}
            y, weights, _ = layer(
                y, step_mask, buffers["cross_keys"], buffers["cross_values"], cross_mask, buffers, position
            )
            layer_outputs.append(y)
            cross_attentions.append(weights)
            hidden_states.append(y)
        y = self.reduce_norm(y + self.reduce_dropout(self.reduce_group(torch.cat(layer_outputs, dim=-1))))  # §5
        return y, tuple(cross_attentions), tuple(hidden_states)


class ExpansionNetV2PreTrainedModel(PreTrainedModel):
    config_class = ExpansionNetV2Config
    base_model_prefix = "expansionnet_v2"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module):
        """
        The authors' init of the body (§1): `xavier_uniform_` on every parameter with more than one dimension (linear
        and embedding weights: expansion vectors, word and position tables), PyTorch's default for linear biases,
        LayerNorm 1 / 0. The authors also xavier-initialise the Swin before loading its ImageNet weights over it, so
        their released model never uses that init: a backbone built from the config keeps timm's own init (or its
        pretrained weights), and one that `from_pretrained` finds missing from the checkpoint is initialised as
        timm's layers do (`init_timm_module`).
        """
        if getattr(module, "in_timm_backbone", False):
            init_timm_module(module)
        elif isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            bound = 1 / math.sqrt(module.in_features)
            init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.Embedding):
            init.xavier_uniform_(module.weight)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    @property
    def max_new_tokens_limit(self):
        """The most new tokens `generate` agrees to decode: the learned position table has `max_position_embeddings`
        rows (74 in the released model) for the tokens fed back, SOS included, and the last token is never fed back."""
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


class ExpansionNetV2ForConditionalGeneration(ExpansionNetV2PreTrainedModel, GenerationMixin):
    """
    ExpansionNet v2 captioner: `encoder` (timm Swin -> static-expansion layers), `decoder` (dynamic-expansion layers
    with cross-attention) and `lm_head` (the authors' `vocab_linear`).

    Generation: every standard `generate` strategy, with the exact incremental cache of §3
    ([`ExpansionNetV2DecoderState`]); the authors' own beam search with `custom_generate=hfcap.reference_beam_search`.
    Defaults in `generation_config`: `GENERATION_DEFAULTS` (their test script's beam 5 and maximum length).
    """

    def __init__(self, config: ExpansionNetV2Config):
        super().__init__(config)
        self.encoder = ExpansionNetV2Encoder(config)
        self.decoder = ExpansionNetV2Decoder(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size)
        self.post_init()
        self.generation_config.update(**GENERATION_DEFAULTS)
        # SOS + the new tokens fit the position table, as the authors' max_seq_len
        self.generation_config.max_new_tokens = min(
            GENERATION_DEFAULTS["max_new_tokens"], config.max_position_embeddings - 1
        )

    def get_encoder(self):
        return self.encoder

    def get_input_embeddings(self):
        return self.decoder.embed_tokens

    def set_input_embeddings(self, value):
        self.decoder.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @classmethod
    def _supports_default_dynamic_cache(cls):
        # The expansion decoder's cache is an ExpansionNetV2DecoderState created in `forward`, not a KV cache.
        return False

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
    ):
        """transformers' cache preparation, plus `cache_implementation="static"`: an
        [`ExpansionNetV2StaticDecoderState`] of `max(max_cache_length, max_cache_len)` positions (the tokens fed
        back), kept on the model so that a later call of the same capacity reuses its buffers and CUDA graph."""
        if (
            generation_config.cache_implementation != "static"
            or generation_config.use_cache is False
            or model_kwargs.get(CACHE_NAME) is not None
        ):
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
        capacity = max(max_cache_length, getattr(generation_config, "max_cache_len", None) or 0)
        state = getattr(self, "_static_decoder_state", None)
        if state is None or state.capacity != capacity:
            state = self._static_decoder_state = ExpansionNetV2StaticDecoderState(capacity)
        state.seq_length = 0
        model_kwargs[CACHE_NAME] = state

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
            visual_features (`torch.FloatTensor` of shape `(B, N, D)`): precomputed backbone tokens (instead).
            visual_attention_mask (`torch.LongTensor` of shape `(B, N)`, *optional*): 1 = real visual token.
            decoder_input_ids (`torch.LongTensor` of shape `(B, T)`): `SOS w_1 ...`; made from `labels` if absent.
            decoder_attention_mask (`torch.LongTensor` of shape `(B, T')`, *optional*): by absolute position, 0 marks
                padding (left padding of prompts, or right padding as the authors'); positions >= T' count as 1.
            attention_mask (`torch.LongTensor`, *optional*): the processor's mask of its `input_ids` prompts, as the
                pipeline passes it to `generate`; same meaning as `decoder_attention_mask` (used when that is absent).
            encoder_outputs ([`ExpansionNetV2EncoderOutput`], *optional*): precomputed encoder output.
            cache ([`ExpansionNetV2DecoderState`], *optional*): continue after the cached positions
                (`past_key_values` is accepted as its older name).
            labels (`torch.LongTensor` of shape `(B, T)`): `w_1 ... EOS`, -100 ignored.
            use_cache (`bool`, *optional*): return the decoder state.
            output_attentions (`bool`, *optional*): return the cross-attention weights.
            output_hidden_states (`bool`, *optional*): return the encoder's and the decoder's hidden states.
            label_smoothing (`float`, defaults to 0.0): label smoothing of the cross-entropy (a training choice,
                never read from the config).
            kwargs: ignored (accepted for what `generate` passes).

        Returns:
            [`ExpansionNetV2Seq2SeqLMOutput`].
        """
        state = resolve_cache(cache, past_key_values)
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
                output_hidden_states=output_hidden_states,
            )
        else:
            if not isinstance(encoder_outputs, ModelOutput):  # a tuple from `return_dict=False`: its first entry
                encoder_outputs = ExpansionNetV2EncoderOutput(last_hidden_state=encoder_outputs[0])
            check_encoder_hidden_states(encoder_outputs.last_hidden_state, (None, None, self.config.d_model))

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
        if state is None or state.get_seq_length() == 0:  # decoding steps only feed back the model's own tokens
            batch_size = encoder_outputs.last_hidden_state.shape[0]
            check_token_ids("decoder_input_ids", decoder_input_ids, self.config.vocab_size, batch_size)

        encoder_hidden_states = encoder_outputs.last_hidden_state.to(self.lm_head.weight.dtype)
        hidden, cross_attentions, decoder_hidden_states, state = self.decoder(
            decoder_input_ids,
            encoder_hidden_states,
            encoder_outputs.get("attention_mask"),
            attention_mask=decoder_attention_mask if decoder_attention_mask is not None else attention_mask,
            state=state,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        logits = self.lm_head(hidden)  # §1.6

        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=-100,
                label_smoothing=label_smoothing,
            )
        output = ExpansionNetV2Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            decoder_hidden_states=decoder_hidden_states,
            cross_attentions=cross_attentions if output_attentions else None,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.get("hidden_states"),
            **{CACHE_NAME: state},
        )
        return output if return_dict else output.to_tuple()

    @torch.no_grad()
    def _reference_beam_search(
        self, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None, **model_kwargs
    ):
        """
        The authors' beam search (§8, captioning_model.py `beam_search`, `sample_or_max="max"`), batched over images as
        theirs: the K first words are the top K after SOS; at every later step each beam proposes its top K words, a
        beam that already holds EOS keeps its score (its first candidate counts 0, the others -999) and appends an
        unused token, the K best of the K*K sums of log-probabilities survive (raw sums, no length normalisation);
        the loop stops once no beam grew or sequences reach `1 + max_new_tokens` tokens (SOS included). The beams are
        then ranked by the sum divided by their length counting SOS and EOS. Greedy decoding is their beam size 1.
        The decoder runs incrementally on the cache, which gives the same log-probabilities as their recomputation.

        Called by `generate(..., custom_generate=hfcap.reference_beam_search)` after the usual input preparation, so
        `encoder_outputs` arrive repeated `max(num_beams, num_return_sequences)` times per image. With
        `cache_implementation="static"` it decodes on the [`ExpansionNetV2StaticDecoderState`] (same results).
        """
        if logits_processor:
            raise ValueError(
                "The reference beam search reproduces the authors' and applies no logits processors; drop "
                f"{[type(processor).__name__ for processor in logits_processor]} or use the standard beam search."
            )
        num_beams = generation_config.num_beams
        num_return_sequences = generation_config.num_return_sequences  # `generate` checked it is <= num_beams
        expand_size = max(num_beams, num_return_sequences)
        start_ids = input_ids[::expand_size]
        if start_ids.shape[1] != 1:
            raise ValueError("The reference beam search starts from the start token alone: it takes no decoder prompt.")
        if not 1 <= num_beams <= self.config.vocab_size:
            raise ValueError(f"`num_beams` must lie in [1, vocab_size={self.config.vocab_size}], got {num_beams}.")
        max_new_tokens = generation_config.max_new_tokens or generation_config.max_length - 1
        max_length = 1 + max_new_tokens  # the authors' beam_max_seq_len, SOS included
        eos_token_id = generation_config.eos_token_id  # theirs has one EOS; the first of a list counts
        eos_token_id = eos_token_id[0] if isinstance(eos_token_id, (list, tuple)) else eos_token_id
        pad_token_id = generation_config.pad_token_id
        pad_token_id = self.config.pad_token_id if pad_token_id is None else pad_token_id
        given = model_kwargs["encoder_outputs"]  # repeated `expand_size` = K times per image
        repeated = ExpansionNetV2EncoderOutput(
            last_hidden_state=given.last_hidden_state, attention_mask=given.get("attention_mask")
        )
        batch_size, k = start_ids.shape[0], num_beams

        # Step 1: decode SOS and take its top K words.
        state = model_kwargs.get(CACHE_NAME)
        if isinstance(state, ExpansionNetV2StaticDecoderState):
            # The static state keeps its rows (and its CUDA graph) for the whole search: SOS runs on all K rows of
            # an image, which are identical, and the image's first row gives the K first words.
            output = self(encoder_outputs=repeated, decoder_input_ids=input_ids, cache=state)
            log_probs = output.logits[::k, -1].log_softmax(dim=-1)
        else:  # once per image, as theirs, then the state is repeated per beam
            image_rows = slice(None, None, expand_size)
            single = ExpansionNetV2EncoderOutput(
                last_hidden_state=repeated.last_hidden_state[image_rows],
                attention_mask=repeated.attention_mask[image_rows] if repeated.attention_mask is not None else None,
            )
            output = self(encoder_outputs=single, decoder_input_ids=start_ids, use_cache=True)
            log_probs = output.logits[:, -1].log_softmax(dim=-1)
            state = output[CACHE_NAME]
            state.batch_repeat_interleave(k)
        first_log_probs, first_words = log_probs.topk(k, dim=-1, sorted=True)  # (B, K)
        encoder_outputs = repeated
        sequences = torch.cat([start_ids.repeat_interleave(k, dim=0), first_words.reshape(-1, 1)], dim=1)  # (B K, 2)
        token_log_probs = torch.cat([log_probs.new_zeros(batch_size * k, 1), first_log_probs.reshape(-1, 1)], dim=1)
        cumulative = token_log_probs.sum(dim=-1, keepdim=True)  # (B K, 1)
        num_elements = torch.full((batch_size * k,), 2, dtype=torch.long, device=sequences.device)
        image_offsets = torch.arange(batch_size, device=sequences.device)[:, None] * k

        # Step 2: extend every beam by one token per step (their loop `for time_step in range(2, max_seq_len)`).
        for _ in range(2, max_length):
            output = self(
                encoder_outputs=encoder_outputs, decoder_input_ids=sequences[:, -1:], cache=state, use_cache=True
            )
            state = output[CACHE_NAME]
            log_probs = output.logits[:, -1].log_softmax(dim=-1)
            candidate_log_probs, candidate_words = log_probs.topk(k, dim=-1, sorted=True)  # (B K, K)
            finished = (sequences == eos_token_id).any(dim=1, keepdim=True)  # (B K, 1)
            # A finished beam survives with its score unchanged: candidate 0 adds 0, the others -999.
            candidate_log_probs[:, :1] = candidate_log_probs[:, :1].masked_fill(finished, 0.0)
            candidate_log_probs[:, 1:] = candidate_log_probs[:, 1:].masked_fill(finished, -999.0)
            sums = (cumulative + candidate_log_probs).view(batch_size, k * k)  # pruning by the raw sum
            chosen = sums.topk(k, dim=-1, sorted=True).indices  # (B, K)
            beam_index = (image_offsets + chosen // k).reshape(-1)  # rows of the surviving parents
            word_index = (chosen % k).reshape(-1, 1)
            sequences = torch.cat([sequences[beam_index], candidate_words[beam_index].gather(1, word_index)], dim=1)
            token_log_probs = torch.cat(
                [token_log_probs[beam_index], candidate_log_probs[beam_index].gather(1, word_index)], dim=1
            )
            cumulative = token_log_probs.sum(dim=-1, keepdim=True)
            grew = ~finished[beam_index, 0]  # num_elem counts tokens up to and including EOS
            num_elements = num_elements[beam_index] + grew.long()
            state.reorder_cache(beam_index)
            if not bool(grew.any()):  # their early stop: no beam grew at this step
                break

        # Step 3: rank by the mean log-probability over the length counting SOS and EOS.
        scores = (cumulative.squeeze(-1) / num_elements).view(batch_size, k)
        ranking = scores.topk(k, dim=-1, sorted=True).indices[:, :num_return_sequences]
        rows = (image_offsets + ranking).reshape(-1)
        lengths = num_elements[rows]
        length = int(lengths.max())
        keep = torch.arange(length, device=sequences.device)[None, :] < lengths[:, None]
        result = sequences[rows, :length].masked_fill(~keep, pad_token_id)
        if not generation_config.return_dict_in_generate:
            return result
        return ExpansionNetV2BeamSearchOutput(
            sequences=result,
            sequences_scores=scores.gather(1, ranking).reshape(-1),
            token_log_probs=token_log_probs[rows, :length].masked_fill(~keep, 0.0),
        )


__all__ = [
    "ExpansionNetV2DecoderState",
    "ExpansionNetV2StaticDecoderState",
    "ExpansionNetV2ForConditionalGeneration",
    "ExpansionNetV2PreTrainedModel",
]
