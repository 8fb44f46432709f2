"""Show, Attend and Tell model configuration."""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


@strict
class ShowAttendTellConfig(PreTrainedConfig):
    r"""
    Configuration of a [`ShowAttendTellForConditionalGeneration`]: Xu et al., "Show, Attend and Tell: Neural Image
    Caption Generation with Visual Attention" (ICML 2015). The defaults build the model of the sgrvinod PyTorch
    tutorial (`a-PyTorch-Tutorial-to-Image-Captioning`, models.py) exactly: ResNet-101 trunk adaptively pooled to
    14x14, additive ReLU attention, a 2048-d sigmoid gate, an `LSTMCell` decoder, `logits = fc(dropout(h))`, and the
    COCO word map of the released checkpoint (9490 words, `<pad>`=0, `<start>`=9488, `<end>`=9489). The switches
    marked "paper variant" give the paper's own choices instead.

    Decoder:
        vocab_size (`int`, defaults to 9490): number of tokens.
        visual_feature_dim (`int`, defaults to 2048): D, the size of the annotation vectors a_i (the channels of the
            backbone's last map; the tutorial's `encoder_dim`).
        attention_dim (`int`, defaults to 512): width of the attention MLP f_att.
        embed_dim (`int`, defaults to 512): word embedding size m.
        d_model (`int`, defaults to 512): LSTM hidden size n (the tutorial's `decoder_dim`).
        dropout (`float`, defaults to 0.5): dropout before the output layer.
        encoder_grid_size (`int`, defaults to 14): the backbone map is adaptively average-pooled to this square grid,
            giving N = encoder_grid_size**2 annotation vectors; also the grid of the returned attention maps.
        attention_activation (`"relu"` or `"tanh"`, defaults to `"relu"`): non-linearity inside f_att (paper Eq. 4).
            The tutorial uses ReLU; `"tanh"` is the paper variant (as in the authors' Theano code).
        gate (`"vector"` or `"scalar"`, defaults to `"vector"`): the gate beta_t = sigmoid(f_beta(h_{t-1})) of
            paper §4.2.1. The tutorial gates every channel (`visual_feature_dim` outputs); `"scalar"` is the paper
            variant.
        deep_output (`bool`, defaults to `False`): paper variant of Eq. 7,
            `logits = L_o tanh(E y_{t-1} + L_h h_t + L_z z_t)` (with tanh, as in the authors' code). The tutorial
            uses `logits = fc(dropout(h_t))`.

    Attention and loss:
        attention_type (`"soft"` or `"hard"`, defaults to `"soft"`): deterministic soft attention (paper §4.2, the
            tutorial) or stochastic hard attention (paper §4.1), trained with the REINFORCE rule below.
        hard_attention_sampling_probability (`float`, defaults to 0.5): hard attention only. Per training
            minibatch, the probability of sampling attention locations; otherwise the batch uses the expected
            context (soft attention), as the authors' code (`semi_sampling_p`, one draw per minibatch).
        reinforce_weight (`float`, defaults to 0.1): lambda_r, weight of the REINFORCE term (authors' code: 1/10).
        entropy_weight (`float`, defaults to 0.002): lambda_e, weight of the entropy bonus (`alpha_entropy_c`).
        baseline_decay (`float`, defaults to 0.9): moving-average baseline b <- decay b + (1 - decay) log p(y|s,a).
        sample_attention_at_inference (`bool`, defaults to `False`): hard attention only. Outside training, sample
            the attended location instead of using the expected context (per call: `sample_attention=`).
        doubly_stochastic_weight (`float`, defaults to 1.0): alpha_c (train.py `alpha_c`), weight of the doubly
            stochastic regulariser mean_{b,i} (1 - sum_t alpha_ti)^2 (paper §4.2.1). Part of the paper's model, so
            it lives here; label smoothing is a trainer's choice (`forward(label_smoothing=...)`).

    Backbone (ignored when `use_backbone=False`):
        use_backbone (`bool`, defaults to `True`): build the timm CNN. `False` gives a features-only model that
            takes `visual_features (B, N, visual_feature_dim)` only (as the tutorial's decoder checkpoints).
        backbone (`str`, defaults to `"resnet101"`): any timm CNN (`timm.create_model(..., features_only=True)`);
            its last feature map must have `visual_feature_dim` channels.
        backbone_kwargs (`dict`, *optional*): extra keyword arguments for `timm.create_model` (e.g. `{"in_chans": 1}`).
        use_pretrained_backbone (`bool`, defaults to `False`): load timm's pretrained weights when the model is built
            from the config (needs the Hugging Face Hub). `from_pretrained` always takes the checkpoint's weights.

    Which backbone stages train, the image size and the loss's label smoothing are not part of the model: the trainer
    freezes stages (`hfcap.training.freeze_backbone`), the processor sizes the images (the tutorial: 256 px).
    """

    model_type = "show_attend_tell"
    # The common names transformers and its integrations read (generate's output checks, DeepSpeed's auto sizes):
    # one LSTM layer whose hidden size is d_model, and one additive attention "head".
    attribute_map = {"hidden_size": "d_model"}
    num_hidden_layers = 1
    num_attention_heads = 1

    vocab_size: int = 9490
    visual_feature_dim: int = 2048
    attention_dim: int = 512
    embed_dim: int = 512
    d_model: int = 512
    dropout: float | int = 0.5
    encoder_grid_size: int = 14
    attention_activation: Literal["relu", "tanh"] = "relu"
    gate: Literal["vector", "scalar"] = "vector"
    deep_output: bool = False

    attention_type: Literal["soft", "hard"] = "soft"
    hard_attention_sampling_probability: float | int = 0.5
    reinforce_weight: float | int = 0.1
    entropy_weight: float | int = 0.002
    baseline_decay: float | int = 0.9
    sample_attention_at_inference: bool = False
    doubly_stochastic_weight: float | int = 1.0

    use_backbone: bool = True
    backbone: str = "resnet101"
    backbone_kwargs: dict | None = None
    use_pretrained_backbone: bool = False

    pad_token_id: int | None = 0
    bos_token_id: int | None = 9488
    eos_token_id: int | None = 9489
    decoder_start_token_id: int | None = 9488
    is_encoder_decoder: bool = True
    tie_word_embeddings: bool = False
    use_cache: bool = True

    def validate_architecture(self):
        """Part of `@strict` validation: ranges that the type hints cannot express."""
        for name in ("vocab_size", "visual_feature_dim", "attention_dim", "embed_dim", "d_model", "encoder_grid_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        for name in ("dropout", "hard_attention_sampling_probability", "baseline_decay"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"`{name}` must lie in [0, 1], got {getattr(self, name)}.")


__all__ = ["ShowAttendTellConfig"]
