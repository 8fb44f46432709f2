"""Meshed-Memory Transformer (M²) model configuration."""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


@strict
class M2TransformerConfig(PreTrainedConfig):
    r"""
    Configuration of a [`M2TransformerForConditionalGeneration`]: Cornia et al., "Meshed-Memory Transformer for Image
    Captioning" (CVPR 2020), as the authors' code (aimagelab/meshed-memory-transformer) builds it. The body defaults are
    the released model's (`MemoryAugmentedEncoder(3, 0, m=40)`, `MeshedDecoder(10201, 54, 3, <pad>=1)`, d_model 512,
    8 heads of 64, d_ff 2048, dropout 0.1, `<unk>`=0 `<pad>`=1 `<bos>`=2 `<eos>`=3). The released model additionally
    needs the authors' input switches, which the converter (`hfcap convert m2-transformer`) writes:
    `use_backbone=False`, `mask_padded_regions=False`, `pad_regions_to=50`, `position_embedding_type="frozen_random"`.
    The defaults of those switches are the behaviour chosen for models trained from scratch.

    Encoder (memory-augmented, post-LN):
        visual_feature_dim (`int`, defaults to 2048): D, width of the visual features entering the encoder's input
            projection `LayerNorm(Dropout(ReLU(Linear(D -> d_model))))`: the bottom-up region features' 2048, or the
            channels of the backbone's last feature map.
        num_encoder_layers (`int`, defaults to 3): encoder layers; each one's output is one level the meshed decoder
            attends to (the authors' decoder hard-codes 3).
        num_memory_slots (`int`, defaults to 40): m learned memory slots appended to every encoder self-attention's
            keys (scaled by sqrt(head_dim)) and values (scaled by sqrt(m)) after their projections; never masked.
        mask_padded_regions (`bool`, defaults to `True`): where `visual_attention_mask` is 0, the position is left out
            of encoder self-attention and of decoder cross-attention (for models trained from scratch). `False` is the
            authors' code: it masks a position only where the LayerNorm output of its projected feature sums to
            exactly 0 (encoders.py:39), which in practice never happens, so padded regions are attended to; rows whose
            `visual_attention_mask` is 0 are set to zero first, as the authors pad with zero rows.
        pad_regions_to (`int`, *optional*): zero-pad the visual features to this many positions before encoding (the
            authors' `ImageDetectionsField(max_detections=50)` pads every image to 50 regions). With
            `mask_padded_regions=False` padded rows are attended to, so only a fixed padding makes an image's caption
            independent of the other images in its batch; the converter sets 50. More positions than this are an
            error. `None` (default): no padding.

    Decoder (meshed, post-LN):
        vocab_size (`int`, defaults to 10201): V, the released vocabulary's size.
        num_decoder_layers (`int`, defaults to 3): decoder layers.
        max_position_embeddings (`int`, defaults to 54): longest decoder input (the authors' `max_len`); the position
            table has one more row, row 0, used for padded positions.
        position_embedding_type (`"sinusoidal"` or `"frozen_random"`, defaults to `"sinusoidal"`): initial value of
            the frozen position table (a buffer, never trained). `"sinusoidal"`: the sinusoids with row 0 zero that the
            authors meant (utils.py `sinusoid_encoding_table`). `"frozen_random"`: what their code actually trains
            with, because `Transformer.init_weights` also applies `xavier_uniform_` to the frozen table. Converted
            checkpoints carry their own (random) table, whichever value this has.

    Both:
        d_model (`int`, defaults to 512): d, the width of every layer.
        num_heads (`int`, defaults to 8): attention heads (the authors' `h`; their `--head` flag is never used).
        head_dim (`int`, defaults to 64): d_k = d_v of each head; `num_heads * head_dim` need not equal `d_model`.
        d_ff (`int`, defaults to 2048): inner width of the position-wise feed-forward layers.
        dropout (`float`, defaults to 0.1): dropout after the input projection, after every attention and inside and
            after every feed-forward layer (never on embeddings or attention weights, as the authors).

    Backbone (ignored when `use_backbone=False`):
        use_backbone (`bool`, defaults to `True`): build a timm backbone so that the model takes `pixel_values`; its
            last feature map, flattened row-major, gives the N grid features. `False`: a features-only model that
            takes `visual_features (B, N, visual_feature_dim)`, e.g. the authors' bottom-up region features (what the
            converter writes).
        backbone (`str`, defaults to `"resnet101"`): any timm model that supports `features_only=True`. The default
            ResNet-101 gives 2048-channel grid features, as wide as the bottom-up region features (themselves from a
            ResNet-101 Faster R-CNN); at 224 px its 7x7 map gives N = 49 positions.
        backbone_kwargs (`dict`, *optional*): extra keyword arguments for `timm.create_model`.
        use_pretrained_backbone (`bool`, defaults to `False`): load timm's pretrained weights when the model is built
            from the config (needs the Hugging Face Hub). `from_pretrained` always takes the checkpoint's weights.

    Tokens: `pad_token_id=1`, `bos_token_id=decoder_start_token_id=2`, `eos_token_id=3` (the released `vocab.pkl`;
    `<unk>` is 0). The output projection has no bias and is not tied to the word embeddings.
    """

    model_type = "m2_transformer"
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "num_heads",
        "num_hidden_layers": "num_decoder_layers",
    }

    vocab_size: int = 10201
    d_model: int = 512
    num_heads: int = 8
    head_dim: int = 64
    d_ff: int = 2048
    num_encoder_layers: int = 3
    num_decoder_layers: int = 3
    num_memory_slots: int = 40
    max_position_embeddings: int = 54
    dropout: float | int = 0.1
    visual_feature_dim: int = 2048
    mask_padded_regions: bool = True
    pad_regions_to: int | None = None
    position_embedding_type: Literal["sinusoidal", "frozen_random"] = "sinusoidal"

    use_backbone: bool = True
    backbone: str = "resnet101"
    backbone_kwargs: dict | None = None
    use_pretrained_backbone: bool = False

    pad_token_id: int | None = 1
    bos_token_id: int | None = 2
    eos_token_id: int | None = 3
    decoder_start_token_id: int | None = 2
    is_encoder_decoder: bool = True
    tie_word_embeddings: bool = False
    use_cache: bool = True

    def validate_architecture(self):
        """Part of `@strict` validation: ranges that the type hints cannot express."""
        for name in (
            "vocab_size",
            "d_model",
            "num_heads",
            "head_dim",
            "d_ff",
            "num_encoder_layers",
            "num_decoder_layers",
            "max_position_embeddings",
            "visual_feature_dim",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        if self.num_memory_slots < 0:
            raise ValueError(f"`num_memory_slots` must be >= 0, got {self.num_memory_slots}.")
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"`dropout` must lie in [0, 1], got {self.dropout}.")
        if self.pad_regions_to is not None and self.pad_regions_to < 1:
            raise ValueError(f"`pad_regions_to` must be a positive integer or None, got {self.pad_regions_to}.")


__all__ = ["M2TransformerConfig"]
