"""The registry is the only place an architecture is wired in: a folder-less toy architecture defined here, registered
with one `register_architecture` call, trains through the trainer (XE, XE on cached features, SCST), is tested,
loaded by hfcap's loader, captions through `hfcap caption` and the pipeline, and is known to the CLI — with no shared
module edited."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import save_images
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel, pipeline
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from hfcap.cli import main
from hfcap.compat import CACHE_NAME
from hfcap.loading import load_captioner
from hfcap.models import ARCHITECTURES, Architecture, get_architecture, register_architecture

GENERATION_DEFAULTS = {"num_beams": 2, "max_new_tokens": 8}  # read by the registry from the model's module


class ToyConfig(PreTrainedConfig):
    model_type = "hfcap_toy"

    def __init__(self, vocab_size=16, visual_feature_dim=96, d_model=16, backbone="test_resnet", use_backbone=True,
                 backbone_kwargs=None, use_pretrained_backbone=False, **kwargs):
        self.vocab_size, self.visual_feature_dim, self.d_model = vocab_size, visual_feature_dim, d_model
        self.backbone, self.use_backbone, self.backbone_kwargs = backbone, use_backbone, backbone_kwargs
        self.use_pretrained_backbone = use_pretrained_backbone
        super().__init__(**{"is_encoder_decoder": True, **kwargs})


class ToyEncoder(nn.Module):
    """Backbone stage: timm's test ResNet map flattened (N = h*w, D = 96); encoder layers: one Linear + tanh."""

    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__()
        import timm

        self.backbone = timm.create_model(config.backbone, features_only=True, out_indices=(-1,))
        self.layer = nn.Linear(config.visual_feature_dim, config.d_model)

    def get_image_features(self, pixel_values):
        return self.backbone(pixel_values)[-1].flatten(2).transpose(1, 2)

    def forward(self, pixel_values=None, visual_features=None, visual_attention_mask=None, **kwargs):
        features = self.get_image_features(pixel_values) if pixel_values is not None else visual_features
        return BaseModelOutput(last_hidden_state=torch.tanh(self.layer(features)))


class ToyForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """A caption model of the contract's shape: each next token from (previous token, mean encoder state)."""

    config_class = ToyConfig
    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__(config)
        self.encoder = ToyEncoder(config)
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size)
        self.post_init()
        self.generation_config.update(**GENERATION_DEFAULTS)

    @property
    def backbone(self):
        return self.encoder.backbone

    def get_encoder(self):
        return self.encoder

    def get_image_features(self, pixel_values):
        return self.encoder.get_image_features(pixel_values)

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False  # no cache: generate feeds the whole prefix every step

    def forward(self, pixel_values=None, visual_features=None, visual_attention_mask=None, decoder_input_ids=None,
                encoder_outputs=None, labels=None, label_smoothing=0.0, **kwargs):
        if encoder_outputs is None:
            encoder_outputs = self.encoder(pixel_values=pixel_values, visual_features=visual_features)
        if decoder_input_ids is None:
            decoder_input_ids = labels.new_full(labels.shape, self.config.pad_token_id)
            decoder_input_ids[:, 1:] = labels[:, :-1].clamp_min(0)
            decoder_input_ids[:, 0] = self.config.decoder_start_token_id
        memory = encoder_outputs.last_hidden_state.mean(1, keepdim=True)
        logits = self.head(torch.tanh(self.embedding(decoder_input_ids) + memory))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), label_smoothing=label_smoothing)
        return Seq2SeqLMOutput(loss=loss, logits=logits, **{CACHE_NAME: None},
                               encoder_last_hidden_state=encoder_outputs.last_hidden_state)


@pytest.fixture
def toy():
    """The toy registered for the duration of a test (its Auto-class registrations are harmless afterwards)."""
    register_architecture(Architecture("hfcap_toy", "hfcap-toy", ToyConfig, ToyForConditionalGeneration))
    yield ARCHITECTURES["hfcap_toy"]
    del ARCHITECTURES["hfcap_toy"]


def test_registration_makes_the_toy_known_everywhere(toy):
    assert get_architecture("hfcap-toy") is toy and get_architecture("hfcap_toy") is toy
    assert toy.generation_defaults == GENERATION_DEFAULTS


def test_the_toy_trains_evaluates_loads_and_captions(toy, tmp_path, capsys):
    from hfcap.data import load_scenes

    scenes_dir = tmp_path / "scenes"
    load_scenes(scenes_dir, num_train=16, num_val=4, num_test=4, image_size=32, num_workers=1)
    config = {
        "output_dir": str(tmp_path / "run"), "num_threads": 1, "report_to": [], "attention_maps": 0,
        "data": {"name": "scenes", "num_train": 16, "num_val": 4, "num_test": 4, "scenes_image_size": 32,
                 "cache_dir": str(scenes_dir)},
        "processor": {"image_size": 32, "min_word_frequency": 1},
        "model": {"type": "hfcap-toy", "config": {}},
        "stages": [
            {"name": "xe_cached", "type": "xe", "cached_features": True, "max_steps": 2, "batch_size": 8,
             "lr": 1e-2, "label_smoothing": 0.1},
            {"name": "xe", "type": "xe", "max_steps": 2, "batch_size": 8, "lr": 1e-2,
             "trainable_backbone_stages": 1},
            {"name": "scst", "type": "scst", "max_steps": 1, "batch_size": 4, "num_samples": 2,
             "max_new_tokens": 6, "lr": 1e-3},
        ],
        "validation": {"num_beams": 1, "max_new_tokens": 6},
        "test": {"num_beams": 2, "max_new_tokens": 6, "full_metrics": False},
    }
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(tmp_path / "toy.yaml")]) == 0
    capsys.readouterr()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert list(metrics["table"]) == ["baseline (most frequent caption)", "xe_cached", "xe", "scst"]
    assert json.loads((tmp_path / "run" / "features" / "xe_cached" / "features.json").read_text())["dim"] == 96

    model, processor = load_captioner(tmp_path / "run" / "model")
    assert isinstance(model, ToyForConditionalGeneration) and model.generation_config.num_beams == 2
    image = save_images(tmp_path)[0]
    assert main(["caption", str(image), "--model", str(tmp_path / "run" / "model")]) == 0
    path, caption = capsys.readouterr().out.rstrip("\n").split("\t")
    assert path == str(image) and pipeline("image-to-text", model=str(tmp_path / "run" / "model"))(
        str(image))[0]["generated_text"] == caption
