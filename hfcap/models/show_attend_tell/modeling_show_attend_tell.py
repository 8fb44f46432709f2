"""PyTorch Show, Attend and Tell (Xu et al., ICML 2015), as in the sgrvinod PyTorch tutorial.

Reading guide. Paper equations are quoted by number: LSTM (1)-(3), attention scores (4), softmax (5), context (6),
output layer (7), hard attention (8)-(9) and its learning rule (§4.1), soft attention's expected context (§4.2)
and the doubly stochastic regulariser (§4.2.1). "Tutorial" means sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning
(models.py, train.py, caption.py): with the default config this module computes exactly what the tutorial computes.

Stages (the hfcap model contract): `get_image_features` is the backbone stage (the CNN's last map, pooled to
g x g and flattened into the annotation vectors); the encoder adds no layers after it (the annotation vectors go to
the decoder as they are); the decoder is the LSTM with attention.

Shapes: B batch, T decoder steps, N = encoder_grid_size**2 annotation vectors, D visual_feature_dim, A attention_dim,
E embed_dim, H d_model (LSTM hidden size), V vocab_size.
"""

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

from .configuration_show_attend_tell import ShowAttendTellConfig

GENERATION_DEFAULTS = {"num_beams": 5, "max_new_tokens": 51}
"""caption.py's beam size 5 (its best reported setting) and its limit of 51 decoding steps; `__init__` writes them
into `generation_config`, the model card reads them here."""
MAX_NEW_TOKENS_LIMIT = 512
"""The longest caption `generate` agrees to decode (`max_new_tokens_limit`; the LSTM has no position table to bound
it, COCO captions have fewer than 60 words), so that a mistyped `max_new_tokens` fails at once instead of running for
hours."""


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
class ShowAttendTellEncoderOutput(ModelOutput):
    """
    Annotation vectors a_1..a_N of the paper.

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(B, N, D)`): the annotation vectors.
        attention_mask (`torch.LongTensor` of shape `(B, N)`, *optional*): 1 for real positions, 0 for padding
            (only for padded region features; grid features have none).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): `(last_hidden_state,)` with `output_hidden_states`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    attention_mask: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ShowAttendTellSeq2SeqLMOutput(Seq2SeqLMOutput):
    """
    [`Seq2SeqLMOutput`] plus the two parts of the loss and, for sampled hard attention, the attended locations.

    Args:
        loss (`torch.FloatTensor` of shape `()`): `loss_ce + doubly_stochastic_weight * loss_doubly_stochastic`. With
            sampled hard attention its gradient also carries the REINFORCE and entropy terms (their value is 0).
        logits (`torch.FloatTensor` of shape `(B, T, V)`): next-token scores before softmax.
        cache ([`ShowAttendTellDecoderState`]): the LSTM state after the last step, when `use_cache=True` (the field
            is `past_key_values` before transformers 5.25: `CACHE_NAME`).
        cross_attentions (`tuple(torch.FloatTensor)`): one tensor `(B, 1, T, N)` (one attention "head"), alpha_t over
            the annotation grid (row-major `encoder_grid_size x encoder_grid_size`), when `output_attentions=True`.
        decoder_hidden_states (`tuple(torch.FloatTensor)`): the word embeddings `(B, T, E)` and the LSTM outputs h_t
            `(B, T, H)`, when `output_hidden_states=True`.
        encoder_last_hidden_state (`torch.FloatTensor` of shape `(B, N, D)`): the annotation vectors.
        loss_ce (`torch.FloatTensor` of shape `()`): token cross-entropy, mean over the tokens whose label is not -100.
        loss_doubly_stochastic (`torch.FloatTensor` of shape `()`): mean over images and positions of
            (1 - sum_t alpha_ti)^2.
        attention_locations (`torch.LongTensor` of shape `(B, T)`): the sampled locations s_t (hard attention only).
    """

    loss_ce: torch.FloatTensor | None = None
    loss_doubly_stochastic: torch.FloatTensor | None = None
    attention_locations: torch.LongTensor | None = None


@dataclass
class ShowAttendTellBeamSearchOutput(ModelOutput):
    """
    Result of the tutorial's beam search (`custom_generate=hfcap.reference_beam_search` with
    `return_dict_in_generate=True`).

    Args:
        sequences (`torch.LongTensor` of shape `(B * R, L)`): `<start> ... <end>`, right-padded with `pad_token_id`;
            R = `num_return_sequences` hypotheses per image, best first.
        sequences_scores (`torch.FloatTensor` of shape `(B * R,)`): raw sums of the tokens' log-probabilities.
        cross_attentions (`tuple(torch.FloatTensor)`): with `output_attentions=True`, one tensor `(B * R, 1, L - 1, N)`;
            row t is the alpha that produced token t + 1 (zeros after `<end>`).
    """

    sequences: torch.LongTensor | None = None
    sequences_scores: torch.FloatTensor | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None


class ShowAttendTellDecoderState:
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
    ShowAttendTellDecoderState,
    ShowAttendTellDecoderState.tree_flatten,
    ShowAttendTellDecoderState.tree_unflatten,
    serialized_type_name=f"{__name__}.ShowAttendTellDecoderState",
    flatten_with_keys_fn=ShowAttendTellDecoderState.tree_flatten_with_keys,
)


def shift_tokens_right(labels, pad_token_id, decoder_start_token_id):
    """`labels (B, T)` -> `decoder_input_ids (B, T)`: prepend the start token, drop the last label, -100 -> pad."""
    decoder_input_ids = labels.new_full(labels.shape, pad_token_id)
    decoder_input_ids[:, 1:] = labels[:, :-1]
    decoder_input_ids[:, 0] = decoder_start_token_id
    return decoder_input_ids.masked_fill(decoder_input_ids == -100, pad_token_id)


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


class ShowAttendTellEncoder(nn.Module):
    """
    The tutorial's `Encoder` as hfcap's two stages. The backbone stage (`get_image_features`): a timm backbone's last
    feature map, adaptively average-pooled to `encoder_grid_size x encoder_grid_size` and flattened row-major into N
    annotation vectors of size D (at the tutorial's 256 px a ResNet's 8x8 map is *upsampled* to 14x14 by this pooling,
    overlapping bins, as there). The encoder proper adds no layers: the annotation vectors, computed from
    `pixel_values` or given as `visual_features`, are its output.
    """

    main_input_name = "pixel_values"

    def __init__(self, config: ShowAttendTellConfig):
        super().__init__()
        self.config = config
        self.num_channels = (config.backbone_kwargs or {}).get("in_chans", 3)
        self.backbone = None
        if config.use_backbone:
            self.backbone = create_feature_map_backbone(config)
            self.adaptive_pool = nn.AdaptiveAvgPool2d((config.encoder_grid_size, config.encoder_grid_size))

    def forward_backbone(self, pixel_values):
        """The backbone stage on checked `pixel_values (B, C, H, W)`: the annotation vectors `(B, N, D)`."""
        feature_map = self.backbone(pixel_values)[-1]  # (B, D, h, w)
        grid = self.adaptive_pool(feature_map)  # (B, D, g, g)
        return grid.permute(0, 2, 3, 1).flatten(1, 2)  # (B, g*g, D), row-major as the tutorial's view(B, -1, D)

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
            pixel_values (`torch.FloatTensor` of shape `(B, C, height, width)`): normalised images.
            visual_features (`torch.FloatTensor` of shape `(B, N, D)`): precomputed annotation vectors instead.
            visual_attention_mask (`torch.LongTensor` of shape `(B, N)`, *optional*): 1 = real position.
            output_attentions: accepted for the `generate` interface; the encoder has no attention.
            output_hidden_states (`bool`, *optional*): also return `hidden_states=(last_hidden_state,)`.

        Returns:
            [`ShowAttendTellEncoderOutput`] with `last_hidden_state (B, N, D)` (a tuple if `return_dict=False`).
        """
        check_visual_inputs(self.config, self.num_channels, pixel_values, visual_features, visual_attention_mask)
        features = self.get_image_features(pixel_values) if pixel_values is not None else visual_features
        output = ShowAttendTellEncoderOutput(
            last_hidden_state=features,
            attention_mask=visual_attention_mask,
            hidden_states=(features,) if output_hidden_states else None,
        )
        return output if return_dict is not False else output.to_tuple()


class ShowAttendTellAttention(nn.Module):
    """
    The attention model f_att (tutorial `Attention`): e_ti = full_att(act(encoder_att(a_i) + decoder_att(h_{t-1}))).
    """

    def __init__(self, config: ShowAttendTellConfig):
        super().__init__()
        self.encoder_att = nn.Linear(config.visual_feature_dim, config.attention_dim)
        self.decoder_att = nn.Linear(config.d_model, config.attention_dim)
        self.full_att = nn.Linear(config.attention_dim, 1)
        self.activation = nn.ReLU() if config.attention_activation == "relu" else nn.Tanh()

    def forward(self, projected_features, hidden, encoder_attention_mask=None):
        """
        Args:
            projected_features (`torch.FloatTensor` of shape `(B, N, A)`): `encoder_att(a)`, computed once per image.
            hidden (`torch.FloatTensor` of shape `(B, H)`): h_{t-1}.
            encoder_attention_mask (`torch.LongTensor` of shape `(B, N)`, *optional*): 0 = padding, never attended.

        Returns:
            `torch.FloatTensor` of shape `(B, N)`: alpha_t.
        """
        scores = self.full_att(self.activation(projected_features + self.decoder_att(hidden).unsqueeze(1)))  # Eq. 4
        scores = scores.squeeze(2)
        if encoder_attention_mask is not None:
            scores = scores.masked_fill(encoder_attention_mask == 0, torch.finfo(scores.dtype).min)
        return scores.softmax(dim=1)  # Eq. 5


class ShowAttendTellDecoder(nn.Module):
    """The LSTM decoder with attention (tutorial `DecoderWithAttention`); parameter names are the tutorial's."""

    def __init__(self, config: ShowAttendTellConfig):
        super().__init__()
        self.config = config
        self.attention = ShowAttendTellAttention(config)
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.decode_step = nn.LSTMCell(config.embed_dim + config.visual_feature_dim, config.d_model, bias=True)
        self.init_h = nn.Linear(config.visual_feature_dim, config.d_model)
        self.init_c = nn.Linear(config.visual_feature_dim, config.d_model)
        self.f_beta = nn.Linear(config.d_model, config.visual_feature_dim if config.gate == "vector" else 1)
        if config.deep_output:
            self.deep_output_h = nn.Linear(config.d_model, config.embed_dim)
            self.deep_output_z = nn.Linear(config.visual_feature_dim, config.embed_dim)
            self.fc = nn.Linear(config.embed_dim, config.vocab_size)
        else:
            self.fc = nn.Linear(config.d_model, config.vocab_size)
        if config.attention_type == "hard":
            self.register_buffer("reinforce_baseline", torch.zeros(()))

    def init_state(self, encoder_hidden_states, encoder_attention_mask=None):
        """h_0 and c_0 from the mean annotation vector (paper §3.1.2; the tutorial uses one Linear, no tanh)."""
        if encoder_attention_mask is None:
            mean_features = encoder_hidden_states.mean(dim=1)
        else:
            mask = encoder_attention_mask.unsqueeze(-1).to(encoder_hidden_states.dtype)
            mean_features = (encoder_hidden_states * mask).sum(dim=1) / mask.sum(dim=1)
        return ShowAttendTellDecoderState({
            "hidden": self.init_h(mean_features),
            "cell": self.init_c(mean_features),
            "projected_features": self.attention.encoder_att(encoder_hidden_states),
        }, static={"projected_features"})

    def step(self, embeddings, state, encoder_hidden_states, encoder_attention_mask, sample_attention):
        """
        One step of the LSTM with attention (the output layer is `output_logits`).

        Args:
            embeddings (`torch.FloatTensor` of shape `(B, E)`): E y_{t-1}, the previous word's embedding.
            state ([`ShowAttendTellDecoderState`]): h_{t-1}, c_{t-1}.
            encoder_hidden_states (`torch.FloatTensor` of shape `(B, N, D)`): a.
            encoder_attention_mask (`torch.LongTensor` of shape `(B, N)` or `None`).
            sample_attention (`bool`): hard attention, sample s_t; otherwise the expected context.

        Returns:
            `(alpha (B, N), location (B,) or None, gated context z_t (B, D), next state with h_t and c_t)`.
        """
        alpha = self.attention(state["projected_features"], state["hidden"], encoder_attention_mask)
        if sample_attention:
            location = torch.multinomial(alpha, 1)  # Eq. 8: s_t ~ Multinoulli_N(alpha_t)
            location = location.squeeze(1)
            context = encoder_hidden_states[torch.arange(location.shape[0], device=location.device), location]  # Eq. 9
        else:
            location = None
            context = (encoder_hidden_states * alpha.unsqueeze(2)).sum(dim=1)  # §4.2: E[z_t] = sum_i alpha_ti a_i
        context = torch.sigmoid(self.f_beta(state["hidden"])) * context  # Eq. 6, phi = beta_t * context (§4.2.1)
        hidden, cell = self.decode_step(torch.cat([embeddings, context], dim=1), (state["hidden"], state["cell"]))  # Eq. 1-3
        next_state = ShowAttendTellDecoderState(
            {"hidden": hidden, "cell": cell, "projected_features": state["projected_features"]}, state.seq_length + 1,
            state.static,
        )
        return alpha, location, context, next_state

    def output_logits(self, embeddings, hidden, context, use_dropout=True):
        """
        The output layer on E y_{t-1} `(..., E)`, h_t `(..., H)` and z_t `(..., D)`: `fc(dropout(h_t))` as the
        tutorial, or Eq. 7 with `deep_output`. Dropout (only active in training mode) unless `use_dropout=False`.
        """
        if self.config.deep_output:
            output = torch.tanh(embeddings + self.deep_output_h(hidden) + self.deep_output_z(context))  # Eq. 7
        else:
            output = hidden  # the tutorial: no deep output
        return self.fc(self.dropout(output) if use_dropout else output)

    def forward(
        self,
        input_ids,
        encoder_hidden_states,
        encoder_attention_mask=None,
        state=None,
        attention_mask=None,
        sample_attention=False,
    ):
        """
        Runs the decoder over `input_ids`, continuing from `state` (or from h_0, c_0).

        Args:
            input_ids (`torch.LongTensor` of shape `(B, T)`): y_0..y_{T-1}.
            encoder_hidden_states (`torch.FloatTensor` of shape `(B, N, D)`): a.
            encoder_attention_mask (`torch.LongTensor` of shape `(B, N)`, *optional*).
            state ([`ShowAttendTellDecoderState`], *optional*): the state after `state.seq_length` earlier tokens.
            attention_mask (`torch.LongTensor` of shape `(B, T')`, *optional*): by absolute position; steps with 0
                (left padding of prompts) leave h and c unchanged. Positions >= T' count as 1.
            sample_attention (`bool`): sample the hard-attention locations.

        Returns:
            `(logits (B, T, V), alphas (B, T, N), embeddings (B, T, E), hidden_states (B, T, H),
            locations (B, T) or None, state)`.
        """
        encoder_hidden_states = encoder_hidden_states.to(self.fc.weight.dtype)
        if state is None:
            state = self.init_state(encoder_hidden_states, encoder_attention_mask)
        embeddings = self.embedding(input_ids)  # E y_{t-1}
        alphas, locations, contexts, hidden_states = [], [], [], []
        for t in range(input_ids.shape[1]):
            alpha, location, context, next_state = self.step(
                embeddings[:, t], state, encoder_hidden_states, encoder_attention_mask, sample_attention
            )
            position = state.seq_length
            if attention_mask is not None and position < attention_mask.shape[1]:
                keep = attention_mask[:, position].bool().unsqueeze(1)
                for name in ("hidden", "cell"):
                    next_state.tensors[name] = torch.where(keep, next_state[name], state[name])
            state = next_state
            alphas.append(alpha)
            locations.append(location)
            contexts.append(context)
            hidden_states.append(state["hidden"])
        locations = torch.stack(locations, dim=1) if sample_attention else None
        hidden_states = torch.stack(hidden_states, 1)
        # one output layer over all steps, so that the returned hidden states are the ones the logits come from
        logits = self.output_logits(embeddings, hidden_states, torch.stack(contexts, 1))
        return logits, torch.stack(alphas, 1), embeddings, hidden_states, locations, state


class ShowAttendTellPreTrainedModel(PreTrainedModel):
    config_class = ShowAttendTellConfig
    base_model_prefix = "show_attend_tell"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module):
        """
        The tutorial's init (models.py `init_weights`): embedding and fc weight U(-0.1, 0.1), fc bias 0, every other
        decoder layer PyTorch's default. A backbone built from the config keeps timm's own init (or its pretrained
        weights); one that `from_pretrained` finds missing from the checkpoint is initialised as timm's layers do.
        """
        decoder = self.decoder
        if getattr(module, "in_timm_backbone", False):
            init_timm_module(module)
        elif module is decoder.embedding or module is decoder.fc:
            init.uniform_(module.weight, -0.1, 0.1)
            if module is decoder.fc:
                init.zeros_(module.bias)
        elif module is decoder and self.config.attention_type == "hard":
            init.zeros_(module.reinforce_baseline)
        elif isinstance(module, (nn.Linear, nn.LSTMCell)):
            module.reset_parameters()  # PyTorch's default, as the tutorial

    @property
    def max_new_tokens_limit(self):
        """The most new tokens `generate` agrees to decode: `MAX_NEW_TOKENS_LIMIT`."""
        return MAX_NEW_TOKENS_LIMIT

    @property
    def backbone(self):
        """The timm backbone of the backbone stage (None for a features-only model); the trainer freezes its stages."""
        return self.get_encoder().backbone

    def get_image_features(self, pixel_values):
        """The backbone stage: `pixel_values (B, C, H, W)` -> `visual_features (B, N, D)`, which every method taking
        `pixel_values` also accepts instead (the feature cache stores them)."""
        return self.get_encoder().get_image_features(pixel_values)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; as Hub remote code, `auto_map` also maps `AutoModel` to this class
        (transformers records only one auto class per model class)."""
        if self.is_remote_code():
            class_ref = f"{type(self).__module__.rpartition('.')[2]}.{type(self).__name__}"
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), "AutoModel": class_ref}
        return super().save_pretrained(save_directory, *args, **kwargs)

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


class ShowAttendTellForConditionalGeneration(ShowAttendTellPreTrainedModel, GenerationMixin):
    """
    Show, Attend and Tell captioner: `encoder` (timm CNN -> N annotation vectors) and `decoder` (LSTM with attention).

    Generation: every standard `generate` strategy with the LSTM state as cache; the tutorial's own beam search with
    `custom_generate=hfcap.reference_beam_search`. Defaults in `generation_config` (`GENERATION_DEFAULTS`): caption.py's
    beam size 5 and at most 51 new tokens.
    """

    def __init__(self, config: ShowAttendTellConfig):
        super().__init__(config)
        self.encoder = ShowAttendTellEncoder(config)
        self.decoder = ShowAttendTellDecoder(config)
        self.post_init()
        self.generation_config.update(**GENERATION_DEFAULTS)

    def get_encoder(self):
        return self.encoder

    def get_input_embeddings(self):
        return self.decoder.embedding

    def set_input_embeddings(self, value):
        self.decoder.embedding = value

    def get_output_embeddings(self):
        return self.decoder.fc

    def set_output_embeddings(self, value):
        self.decoder.fc = value

    @classmethod
    def _supports_default_dynamic_cache(cls):
        # The decoder is recurrent: its cache is a ShowAttendTellDecoderState created in `forward`, not a KV cache.
        return False

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
        sample_attention=None,
        label_smoothing=0.0,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`): images from the processor.
            visual_features (`torch.FloatTensor` of shape `(B, N, D)`): precomputed annotation vectors (instead).
            visual_attention_mask (`torch.LongTensor` of shape `(B, N)`, *optional*): 1 = real position.
            decoder_input_ids (`torch.LongTensor` of shape `(B, T)`): `<start> w_1 ...`; made from `labels` if absent.
            decoder_attention_mask (`torch.LongTensor` of shape `(B, T')`, *optional*): 0 marks (left) padding of the
                decoder prompt; those steps leave the LSTM state unchanged.
            attention_mask (`torch.LongTensor`, *optional*): the processor's mask of its `input_ids` prompts, as the
                pipeline passes it to `generate`; same meaning as `decoder_attention_mask` (used when that is absent).
            encoder_outputs ([`ShowAttendTellEncoderOutput`], *optional*): precomputed encoder output.
            cache ([`ShowAttendTellDecoderState`], *optional*): continue from this LSTM state.
            past_key_values: the same under its name before transformers 5.25 (give one of the two).
            labels (`torch.LongTensor` of shape `(B, T)`): `w_1 ... <end>`, -100 ignored.
            use_cache (`bool`, *optional*): return the LSTM state as the cache.
            sample_attention (`bool`, *optional*): hard attention only. Sample the attended locations (True) or use the
                expected context (False). Default: in training, one Bernoulli(`hard_attention_sampling_probability`)
                draw per minibatch; otherwise `sample_attention_at_inference`.
            label_smoothing (`float`, defaults to 0): label smoothing of the token cross-entropy (a trainer's choice,
                not in the tutorial).

        Returns:
            [`ShowAttendTellSeq2SeqLMOutput`].
        """
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
                encoder_outputs = ShowAttendTellEncoderOutput(last_hidden_state=encoder_outputs[0])
            check_encoder_hidden_states(encoder_outputs.last_hidden_state, (None, None, self.config.visual_feature_dim))

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
        state = resolve_cache(cache, past_key_values)
        if state is None:  # a decoding step of `generate` only feeds back the model's own tokens: checked once
            batch_size = encoder_outputs.last_hidden_state.shape[0]
            check_token_ids("decoder_input_ids", decoder_input_ids, self.config.vocab_size, batch_size)

        sample_attention = self._resolve_sample_attention(sample_attention)
        encoder_attention_mask = encoder_outputs.get("attention_mask")
        logits, alphas, embeddings, hidden_states, locations, state = self.decoder(
            decoder_input_ids,
            encoder_outputs.last_hidden_state,
            encoder_attention_mask,
            state=state,
            attention_mask=decoder_attention_mask if decoder_attention_mask is not None else attention_mask,
            sample_attention=sample_attention,
        )

        loss = loss_ce = loss_doubly_stochastic = None
        if labels is not None:
            loss, loss_ce, loss_doubly_stochastic = self._compute_loss(
                logits, labels, alphas, locations, encoder_attention_mask, label_smoothing
            )

        output = ShowAttendTellSeq2SeqLMOutput(
            loss=loss,
            logits=logits,
            **{CACHE_NAME: state if use_cache else None},
            decoder_hidden_states=(embeddings, hidden_states) if output_hidden_states else None,
            cross_attentions=(alphas.unsqueeze(1),) if output_attentions else None,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.get("hidden_states"),
            loss_ce=loss_ce,
            loss_doubly_stochastic=loss_doubly_stochastic,
            attention_locations=locations,
        )
        return output if return_dict else output.to_tuple()


    def _resolve_sample_attention(self, sample_attention):
        if self.config.attention_type == "soft":
            if sample_attention:
                raise ValueError("`sample_attention=True` needs a hard-attention model (`attention_type='hard'`).")
            return False
        if sample_attention is not None:
            return bool(sample_attention)
        if self.training:
            # One draw per minibatch (the authors' `semi_sampling_p`); otherwise this batch uses the expected context.
            return bool(torch.rand(()) < self.config.hard_attention_sampling_probability)
        return self.config.sample_attention_at_inference

    def _compute_loss(self, logits, labels, alphas, locations, encoder_attention_mask, label_smoothing):
        """
        Token cross-entropy (the tutorial's CrossEntropyLoss over packed tokens = mean over labels != -100) plus
        alpha_c times the doubly stochastic regulariser; with sampled hard attention, the REINFORCE surrogate of §4.1.
        """
        token_mask = labels.ne(-100)
        loss_ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=-100,
            label_smoothing=label_smoothing,
        )
        attention_sums = (alphas * token_mask.unsqueeze(-1)).sum(dim=1)  # sum_t alpha_ti over each caption's steps
        penalty = (1.0 - attention_sums) ** 2  # §4.2.1 doubly stochastic attention: sum_i (1 - sum_t alpha_ti)^2
        if encoder_attention_mask is None:
            loss_doubly_stochastic = penalty.mean()
        else:
            position_mask = encoder_attention_mask.to(penalty.dtype)
            loss_doubly_stochastic = (penalty * position_mask).sum() / position_mask.sum()
        loss = loss_ce + self.config.doubly_stochastic_weight * loss_doubly_stochastic
        if locations is not None:
            loss = loss + self._reinforce_surrogate(logits, labels, token_mask, alphas, locations)
        return loss, loss_ce, loss_doubly_stochastic

    def _reinforce_surrogate(self, logits, labels, token_mask, alphas, locations):
        """
        Paper §4.1 learning rule for hard attention, per caption:
            d log p(y|s,a) + lambda_r (log p(y|s,a) - b) d log p(s|a) + lambda_e d H[s],
        b the moving-average baseline. The first term is the cross-entropy's gradient; this returns a term whose value
        is 0 and whose gradient is minus the other two, summed over captions and divided by the number of tokens (the
        cross-entropy's normalisation), so that `loss.backward()` follows the paper's estimator. In training mode it
        then updates b <- decay * b + (1 - decay) * mean log p(y|s,a).
        """
        token_log_probs = logits.log_softmax(-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        log_likelihood = (token_log_probs * token_mask).sum(dim=1)  # log p(y | s, a), (B,)
        alpha_at_location = alphas.gather(-1, locations.unsqueeze(-1)).squeeze(-1)
        log_p_locations = (alpha_at_location.log() * token_mask).sum(dim=1)  # log p(s | a), Eq. 8
        step_entropy = -(alphas * alphas.clamp_min(torch.finfo(alphas.dtype).tiny).log()).sum(dim=-1)
        entropy = (step_entropy * token_mask).sum(dim=1)  # H[s]
        baseline = self.decoder.reinforce_baseline
        advantage = (log_likelihood - baseline).detach()
        objective = self.config.reinforce_weight * advantage * log_p_locations + self.config.entropy_weight * entropy
        surrogate = -(objective - objective.detach()).sum() / token_mask.sum()
        if self.training:
            decay = self.config.baseline_decay
            baseline.mul_(decay).add_((1.0 - decay) * log_likelihood.detach().mean())
        return surrogate

    @torch.no_grad()
    def _reference_beam_search(
        self, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None, **model_kwargs
    ):
        """
        The tutorial's beam search (caption.py `caption_image_beam_search`), one image at a time: k copies of
        `<start>`; step 1 takes the top k of row 0 only; scores are raw sums of log_softmax(fc(h)) (no dropout, no
        length penalty); a hypothesis that emits `<end>` is set aside and the beam shrinks; the search stops when the
        beam is empty or after `max_new_tokens` steps (caption.py: 51). The best completed hypothesis wins (first
        maximum in completion order); if none completed, the best unfinished one is returned instead of failing.

        Called by `generate(..., custom_generate=hfcap.reference_beam_search)` after the usual input preparation, so
        `encoder_outputs` arrive repeated `max(num_beams, num_return_sequences)` times per image.
        """
        if logits_processor:
            raise ValueError(
                "The reference beam search reproduces the tutorial's and applies no logits processors; drop "
                f"{[type(processor).__name__ for processor in logits_processor]} or use the standard beam search."
            )
        num_beams = generation_config.num_beams
        if not 1 <= num_beams <= self.config.vocab_size:
            raise ValueError(f"`num_beams` must lie in [1, vocab_size={self.config.vocab_size}], got {num_beams}.")
        num_return_sequences = generation_config.num_return_sequences  # `generate` checked it is <= num_beams
        expand_size = max(num_beams, num_return_sequences)
        start_ids = input_ids[::expand_size]
        if start_ids.shape[1] != 1:
            raise ValueError("The reference beam search starts from the start token alone: it takes no decoder prompt.")
        max_new_tokens = generation_config.max_new_tokens or generation_config.max_length - 1
        eos_token_ids = torch.tensor(generation_config.eos_token_id or [], dtype=torch.long, device=input_ids.device)
        encoder_outputs = model_kwargs["encoder_outputs"]
        features = encoder_outputs.last_hidden_state[::expand_size].to(self.decoder.fc.weight.dtype)
        feature_masks = encoder_outputs.get("attention_mask")
        feature_masks = feature_masks[::expand_size] if feature_masks is not None else None

        hypotheses = []
        for image in range(features.shape[0]):
            hypotheses.append(
                self._reference_beam_search_one_image(
                    start_ids[image],
                    features[image : image + 1],
                    feature_masks[image : image + 1] if feature_masks is not None else None,
                    num_beams,
                    max_new_tokens,
                    eos_token_ids,
                )[:num_return_sequences]
            )
        return self._pack_reference_hypotheses(hypotheses, features.shape[1], generation_config)

    def _reference_beam_search_one_image(self, start_id, features, feature_mask, beam_size, max_new_tokens, eos_ids):
        """Returns `[(tokens (L,), score, alphas (L - 1, N))]`, best first: completed ones, then unfinished ones."""
        k = beam_size
        vocab_size = self.config.vocab_size
        encoder_out = features.expand(k, -1, -1)
        mask = feature_mask.expand(k, -1) if feature_mask is not None else None
        state = self.decoder.init_state(encoder_out, mask)
        prev_words = start_id.expand(k)
        seqs = prev_words.unsqueeze(1)
        seqs_alpha = encoder_out.new_zeros(k, 0, encoder_out.shape[1])
        top_k_scores = encoder_out.new_zeros(k, 1)
        complete = []
        step = 1
        while True:
            embeddings = self.decoder.embedding(prev_words)
            alpha, _, context, state = self.decoder.step(embeddings, state, encoder_out, mask, sample_attention=False)
            logits = self.decoder.output_logits(embeddings, state["hidden"], context, use_dropout=False)
            scores = top_k_scores.expand_as(logits) + logits.log_softmax(dim=1)
            if step == 1:  # all k rows are identical at the first step
                top_k_scores, top_k_words = scores[0].topk(k, 0, True, True)
            else:
                top_k_scores, top_k_words = scores.view(-1).topk(k, 0, True, True)
            prev_word_inds = top_k_words // vocab_size
            next_word_inds = top_k_words % vocab_size
            seqs = torch.cat([seqs[prev_word_inds], next_word_inds.unsqueeze(1)], dim=1)
            seqs_alpha = torch.cat([seqs_alpha[prev_word_inds], alpha[prev_word_inds].unsqueeze(1)], dim=1)
            finished = torch.isin(next_word_inds, eos_ids)
            for ind in finished.nonzero().flatten().tolist():
                complete.append((seqs[ind], top_k_scores[ind], seqs_alpha[ind]))
            k -= int(finished.sum())
            if k == 0:
                break
            incomplete_inds = (~finished).nonzero().flatten()
            seqs = seqs[incomplete_inds]
            seqs_alpha = seqs_alpha[incomplete_inds]
            state.batch_select_indices(prev_word_inds[incomplete_inds])
            encoder_out = encoder_out[prev_word_inds[incomplete_inds]]
            mask = mask[prev_word_inds[incomplete_inds]] if mask is not None else None
            top_k_scores = top_k_scores[incomplete_inds].unsqueeze(1)
            prev_words = next_word_inds[incomplete_inds]
            if step >= max_new_tokens:
                break
            step += 1
        unfinished = [(seqs[i], top_k_scores[i, 0], seqs_alpha[i]) for i in range(k)]

        def best_first(hypotheses):  # stable: equal scores keep completion order, as caption.py's max()
            return sorted(hypotheses, key=lambda hypothesis: -float(hypothesis[1]))

        return best_first(complete) + best_first(unfinished)

    def _pack_reference_hypotheses(self, hypotheses, num_positions, generation_config):
        rows = [hypothesis for image_hypotheses in hypotheses for hypothesis in image_hypotheses]
        length = max(tokens.shape[0] for tokens, _, _ in rows)
        sequences = rows[0][0].new_full((len(rows), length), self.config.pad_token_id)
        scores = torch.stack([score for _, score, _ in rows])
        alphas = rows[0][2].new_zeros(len(rows), length - 1, num_positions)
        for row, (tokens, _, token_alphas) in enumerate(rows):
            sequences[row, : tokens.shape[0]] = tokens
            alphas[row, : token_alphas.shape[0]] = token_alphas
        if not generation_config.return_dict_in_generate:
            return sequences
        return ShowAttendTellBeamSearchOutput(
            sequences=sequences,
            sequences_scores=scores,
            cross_attentions=(alphas.unsqueeze(1),) if generation_config.output_attentions else None,
        )



__all__ = [
    "ShowAttendTellDecoderState",
    "ShowAttendTellForConditionalGeneration",
    "ShowAttendTellPreTrainedModel",
]
