"""One small tester per hfcap architecture, with the same factory surface, for the shared model suite
(`test_models_common.py`), as transformers' `ModelTester` classes do for its common tests.

A tester builds tiny configs and models (random, seeded), their inputs and a processor. `has_pixels`: the model takes
`pixel_values` through a timm backbone (`pixel_inputs`); every tester has a features-only variant
(`use_backbone=False`, `feature_inputs`: `visual_features`, plus `visual_attention_mask` where the architecture
takes variable-N regions, as M²'s bottom-up features). `inputs` are the tester's own kind. Tokens: one word list
(`WORDS`) with each architecture's special tokens in the authors' positions.
"""

import torch
from PIL import Image

from hfcap.models.expansionnet_v2 import ExpansionNetV2Config, ExpansionNetV2ForConditionalGeneration
from hfcap.models.m2_transformer import M2TransformerConfig, M2TransformerForConditionalGeneration
from hfcap.models.show_attend_tell import ShowAttendTellConfig, ShowAttendTellForConditionalGeneration
from hfcap.processing import CaptioningProcessor, make_image_processor, tokenizer_from_vocabulary

WORDS = ["a", "man", "dog", "riding", "horse", "on", "the", "beach", "red", "circle", "blue", "square", "two", "green"]
"""The vocabulary's words; each tester puts its special tokens around them."""

TRAIN_REFERENCES = [["a man riding a horse", "a man on a horse"], ["a dog on the beach", "two dogs on the beach"]]
"""Reference captions of two images (SCST rewards)."""


class ModelTester:
    """The factory surface of every tester; subclasses set the class attributes and `base_config`."""

    name: str
    config_class: type
    model_class: type
    vocabulary: list[str]  # special tokens and WORDS, a token's id is its position
    special_tokens: dict  # processor keyword -> token
    has_pixels = True
    image_size = 32
    num_positions = 4  # N of `inputs` (pixel testers: a grid, whose attention maps can be drawn)

    def __init__(self):
        self.vocab_size = len(self.vocabulary)
        ids = {keyword: self.vocabulary.index(token) for keyword, token in self.special_tokens.items()}
        self.pad_token_id, self.bos_token_id, self.eos_token_id = ids["pad_token"], ids["bos_token"], ids["eos_token"]

    def base_config(self) -> dict:
        raise NotImplementedError

    def config(self, **overrides):
        values = {
            **self.base_config(),
            "vocab_size": self.vocab_size,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "decoder_start_token_id": self.bos_token_id,
            "use_backbone": self.has_pixels,
        }
        return self.config_class(**{**values, **overrides})

    def model(self, seed=0, **overrides):
        torch.manual_seed(seed)
        return self.model_class(self.config(**overrides)).eval()

    def captions(self):
        """Labels of `inputs()`'s two images: captions of 2 and 4 words (ids after the four special tokens), then
        `<eos>` (-100 after it)."""
        eos = self.eos_token_id
        return torch.tensor([[5, 6, eos, -100, -100], [7, 8, 9, 10, eos]])

    def captioner(self, seed=0, steps=100):
        """A tiny model trained (teacher forcing, the layers after the backbone only) to give `inputs()`'s two images
        the `captions()`, so that captions depend on the image and beams end after different numbers of steps, as
        a real captioner's do."""
        model = self.model(seed)
        inputs = self.inputs()
        if "pixel_values" in inputs:  # the backbone stays as it is: train on its features
            with torch.no_grad():
                inputs = {"visual_features": model.get_image_features(inputs["pixel_values"])}
        trained = [parameter for name, parameter in model.named_parameters() if ".backbone." not in f".{name}"]
        optimizer = torch.optim.Adam(trained, lr=0.01)
        model.train()
        for _ in range(steps):
            loss = model(**inputs, labels=self.captions()).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return model.eval()

    def pixel_values(self, batch_size=2, seed=1, size=None):
        """Normalised images, alternately darker and brighter (so that even a random backbone tells them apart)."""
        size = size or self.image_size
        noise = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))
        brightness = torch.tensor([-1.0, 1.0]).repeat(batch_size)[:batch_size, None, None, None]
        return 0.5 * noise + brightness

    def pixel_inputs(self, batch_size=2, seed=1):
        return {"pixel_values": self.pixel_values(batch_size, seed)}

    def feature_inputs(self, batch_size=2, seed=1):
        dim = self.base_config()["visual_feature_dim"]
        generator = torch.Generator().manual_seed(seed)
        return {"visual_features": torch.rand(batch_size, self.num_positions, dim, generator=generator)}

    def inputs(self, batch_size=2, seed=1):
        """Visual inputs of this tester's kind (pixels, or features)."""
        return self.pixel_inputs(batch_size, seed) if self.has_pixels else self.feature_inputs(batch_size, seed)

    def single_inputs(self, inputs, index):
        """Image `index` of `inputs` alone, as a user would pass it (M²'s regions without their padding)."""
        return {name: value[index : index + 1] for name, value in inputs.items()}

    def processor(self):
        tokenizer = tokenizer_from_vocabulary(self.vocabulary, **self.special_tokens)
        return CaptioningProcessor(make_image_processor(self.image_size), tokenizer, max_caption_length=12)

    def images(self, count=2):
        """Small PIL images of different content."""
        generator = torch.Generator().manual_seed(3)
        return [
            Image.fromarray(torch.randint(0, 256, (40, 48, 3), generator=generator, dtype=torch.uint8).numpy())
            for _ in range(count)
        ]

    def head_axes(self):
        """The axes between the batch and T of `cross_attentions`: the heads (M²: levels, heads)."""
        return (self.config().num_heads,)

    def num_decoder_layers(self):
        return self.config().num_decoder_layers

    def cross_attention_shape(self, batch_size, steps, num_positions):
        return (batch_size, *self.head_axes(), steps, num_positions)

    def __repr__(self):
        return self.name


class ShowAttendTellTester(ModelTester):
    """timm `test_resnet` (96 channels, stride 32) at 32 px, its 1x1 map pooled to a 2x2 grid (N = 4); 16-d
    attention, embedding and LSTM."""

    name = "show_attend_tell"
    config_class = ShowAttendTellConfig
    model_class = ShowAttendTellForConditionalGeneration
    vocabulary = ["<pad>", "<start>", "<end>", "<unk>", *WORDS]
    special_tokens = {"pad_token": "<pad>", "bos_token": "<start>", "eos_token": "<end>", "unk_token": "<unk>"}

    def base_config(self):
        return {
            "backbone": "test_resnet", "visual_feature_dim": 96, "encoder_grid_size": 2, "attention_dim": 16,
            "embed_dim": 16, "d_model": 16, "dropout": 0.0,
        }

    def head_axes(self):
        return (1,)  # one additive attention "head"

    def num_decoder_layers(self):
        return 1  # one LSTM


class M2TransformerFeaturesTester(ModelTester):
    """Features-only M² on variable-N region features (N = 6 and 3 real regions, padded to 6 and masked), D = 12,
    d 16, 2 heads of 8, 3 memory slots, 3 encoder levels, 2 decoder layers."""

    name = "m2_transformer-features"
    config_class = M2TransformerConfig
    model_class = M2TransformerForConditionalGeneration
    vocabulary = ["<unk>", "<pad>", "<bos>", "<eos>", *WORDS]
    special_tokens = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
    has_pixels = False
    num_positions = 6
    regions = (6, 3)

    def base_config(self):
        return {
            "d_model": 16, "num_heads": 2, "head_dim": 8, "d_ff": 32, "num_memory_slots": 3, "num_encoder_layers": 3,
            "num_decoder_layers": 2, "max_position_embeddings": 24, "visual_feature_dim": 12, "dropout": 0.0,
            "backbone": "test_resnet",
        }

    def head_axes(self):
        config = self.config()
        return (config.num_encoder_layers, config.num_heads)

    def feature_inputs(self, batch_size=2, seed=1):
        inputs = super().feature_inputs(batch_size, seed)
        counts = torch.tensor([self.regions[i % len(self.regions)] for i in range(batch_size)])
        inputs["visual_attention_mask"] = (torch.arange(self.num_positions) < counts[:, None]).long()
        return inputs

    def single_inputs(self, inputs, index):
        if "visual_attention_mask" not in inputs:
            return super().single_inputs(inputs, index)
        real = int(inputs["visual_attention_mask"][index].sum())
        return {"visual_features": inputs["visual_features"][index : index + 1, :real]}


class M2TransformerPixelsTester(M2TransformerFeaturesTester):
    """M² on the grid of timm `test_resnet` (96 channels, stride 32) at 64 px: N = 4 grid features."""

    name = "m2_transformer-pixels"
    has_pixels = True
    image_size = 64
    num_positions = 4

    def base_config(self):
        return {**super().base_config(), "visual_feature_dim": 96}

    def feature_inputs(self, batch_size=2, seed=1):
        return ModelTester.feature_inputs(self, batch_size, seed)


class ExpansionNetV2Tester(ModelTester):
    """A 32 px Swin (patch 4, window 4, widths 8/16; stage 1 has a shifted block) whose final 4x4 map gives N = 16
    tokens of width 16; body d 16, 2 heads, 2 + 2 layers, expansion groups 2/4, 3 dynamic expansions. Alphabetical
    vocabulary, as the authors'."""

    name = "expansionnet_v2"
    config_class = ExpansionNetV2Config
    model_class = ExpansionNetV2ForConditionalGeneration
    vocabulary = ["EOS", "PAD", "SOS", "UNK", *WORDS]
    special_tokens = {"pad_token": "PAD", "bos_token": "SOS", "eos_token": "EOS", "unk_token": "UNK"}
    num_positions = 16

    def base_config(self):
        return {
            "backbone": "swin_tiny_patch4_window7_224",
            "backbone_kwargs": {
                "img_size": 32, "embed_dim": 8, "depths": [2, 1], "num_heads": [1, 2], "window_size": 4
            },
            "visual_feature_dim": 16, "d_model": 16, "num_heads": 2, "d_ff": 32, "num_encoder_layers": 2,
            "num_decoder_layers": 2, "static_expansion_groups": [2, 4], "num_dynamic_expansions": 3,
            "max_position_embeddings": 24,
        }


TESTERS = [ShowAttendTellTester(), M2TransformerFeaturesTester(), M2TransformerPixelsTester(), ExpansionNetV2Tester()]
"""Every architecture (M² with region features and with pixels)."""
