"""ExpansionNet v2 model configuration."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


@strict
class ExpansionNetV2Config(PreTrainedConfig):
    r"""
    Configuration of an [`ExpansionNetV2ForConditionalGeneration`]: Hu, Cavicchioli and Capotondi, "Exploiting
    Multiple Sequence Lengths in Fast End to End Training for Image Captioning" (BigData 2023), as implemented in
    jchenghu/ExpansionNet_v2 (`End_ExpansionNet_v2`). The defaults build the authors' released model exactly: a
    Swin-L/384 (window 12) backbone whose final normalised 12x12 map gives 144 tokens of width 1536, d_model 512,
    3 static-expansion encoder layers (groups 32/64/128/256/512), 3 dynamic-expansion decoder layers (16 expansions,
    8-head cross-attention), the released 10,000-word COCO vocabulary (alphabetical ids: EOS=77, PAD=78, SOS=79,
    UNK=80) and a 74-row learned position table. The dropouts default to 0.0, the authors' demo and test values; their
    training stages set all five to 0.3 (cross-entropy) or 0.1 (SCST).

    Backbone (ignored when `use_backbone=False`):
        use_backbone (`bool`, defaults to `True`): build the timm backbone. `False` gives the features-only model (the
            authors' body-only `ExpansionNet_v2`, trained on cached Swin features) that takes
            `visual_features (B, N, visual_feature_dim)` only.
        backbone (`str`, defaults to `"swin_large_patch4_window12_384.ms_in22k"`): timm model name (with an optional
            pretrained tag); its `forward_features` output (NHWC for Swin) is flattened row-major into N tokens. The
            default is Swin-L/384, window 12, tagged with the ImageNet-22k weights the authors started from
            (`swin_large_patch4_window12_384_22k.pth`).
        backbone_kwargs (`dict`, *optional*): extra `timm.create_model` arguments, e.g. a small Swin:
            `{"img_size": 96, "embed_dim": 16, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8], "window_size": 3}`.
            timm's Swin defaults to `drop_path_rate=0.1`, the authors' end-to-end training value (inactive in eval).
        use_pretrained_backbone (`bool`, defaults to `False`): load timm's pretrained weights when the model is built
            from the config (needs the Hugging Face Hub; never when building on the meta device, as `from_pretrained`
            does). Without the `.ms_in22k` tag timm would pick its default ImageNet-22k->1k fine-tuned weights.
        visual_feature_dim (`int`, defaults to 1536): D, the width of the backbone tokens (`final_swin_dim`).

    Captioning body:
        vocab_size (`int`, defaults to 10000): V.
        d_model (`int`, defaults to 512): d.
        num_heads (`int`, defaults to 8): heads of the decoder's cross-attention (the only attention in the body).
        d_ff (`int`, defaults to 2048): inner width of the feed-forward blocks (`ff`).
        num_encoder_layers (`int`, defaults to 3): static-expansion encoder layers (`N_enc`).
        num_decoder_layers (`int`, defaults to 3): dynamic-expansion decoder layers (`N_dec`).
        static_expansion_groups (`list[int]`, defaults to `[32, 64, 128, 256, 512]`): sizes of the static expansion's
            groups (`num_exp_enc_list`); each group normalises its backward pass separately.
        num_dynamic_expansions (`int`, defaults to 16): expansion vectors per decoder position (`num_exp_dec`).
        max_position_embeddings (`int`, defaults to 74): rows of the learned decoder position table (`max_seq_len`);
            decoder inputs are at most this long.
        expansion_eps (`float`, defaults to 1e-9): added to every expansion normalisation's sum (the authors' ONNX
            copy uses 1e-4).

    Dropout (the authors' five `drop_args` knobs):
        dropout_enc (`float`, defaults to 0.0): every dropout inside the encoder layers (scores, forward and backward
            expansion outputs, residual branches, feed-forward).
        dropout_dec (`float`, defaults to 0.0): the same inside the decoder layers, including after the
            cross-attention (whose attention probabilities get none).
        dropout_enc_input (`float`, defaults to 0.0): after the input projection of the visual tokens.
        dropout_dec_input (`float`, defaults to 0.0): on the word embeddings, before the sqrt(d) scaling.
        dropout_other (`float`, defaults to 0.0): on the outputs of the two cross-layer reductions.

    Images: the processor squash-resizes to 384x384 with bilinear interpolation and ImageNet mean/std, as the
    authors. It converts non-RGB images (grayscale, palette, RGBA ...) to RGB; the authors' code replaces every non-RGB
    image by an all-black one (COCO's grayscale images included, in training and evaluation), so scores on data with
    such images can differ slightly from theirs.
    """

    model_type = "expansionnet_v2"
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "num_heads",
        "num_hidden_layers": "num_decoder_layers",
    }

    use_backbone: bool = True
    backbone: str = "swin_large_patch4_window12_384.ms_in22k"
    backbone_kwargs: dict | None = None
    use_pretrained_backbone: bool = False
    visual_feature_dim: int = 1536

    vocab_size: int = 10000
    d_model: int = 512
    num_heads: int = 8
    d_ff: int = 2048
    num_encoder_layers: int = 3
    num_decoder_layers: int = 3
    static_expansion_groups: list[int] | tuple[int, ...] = (32, 64, 128, 256, 512)
    num_dynamic_expansions: int = 16
    max_position_embeddings: int = 74
    expansion_eps: float = 1e-9

    dropout_enc: float | int = 0.0
    dropout_dec: float | int = 0.0
    dropout_enc_input: float | int = 0.0
    dropout_dec_input: float | int = 0.0
    dropout_other: float | int = 0.0

    pad_token_id: int | None = 78
    bos_token_id: int | None = 79
    eos_token_id: int | None = 77
    decoder_start_token_id: int | None = 79
    is_encoder_decoder: bool = True
    tie_word_embeddings: bool = False
    use_cache: bool = True

    def validate_architecture(self):
        """Part of `@strict` validation: ranges that the type hints cannot express."""
        for name in (
            "visual_feature_dim",
            "vocab_size",
            "d_model",
            "num_heads",
            "d_ff",
            "num_encoder_layers",
            "num_decoder_layers",
            "num_dynamic_expansions",
            "max_position_embeddings",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        if self.d_model % self.num_heads:
            raise ValueError(f"`d_model={self.d_model}` must be divisible by `num_heads={self.num_heads}`.")
        groups = list(self.static_expansion_groups)
        if not groups or any(not isinstance(size, int) or size < 1 for size in groups):
            raise ValueError(f"`static_expansion_groups` must be a non-empty list of positive integers, got {groups}.")
        if not self.expansion_eps > 0:
            raise ValueError(f"`expansion_eps` must be positive, got {self.expansion_eps}.")
        for name in ("dropout_enc", "dropout_dec", "dropout_enc_input", "dropout_dec_input", "dropout_other"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"`{name}` must lie in [0, 1], got {getattr(self, name)}.")


__all__ = ["ExpansionNetV2Config"]
