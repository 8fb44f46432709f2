"""Which backbone stages train: the trainer's choice (a stage's `trainable_backbone_stages`), never the model's.

    freeze_backbone(model, trainable_stages)     requires_grad of `model.backbone` by timm feature stage
    backbone_parameter_stages(backbone) -> dict  parameter name -> its feature stage

Stages are timm's `feature_info` entries (ResNet: stem+layer1 ... layer4, Swin: the four `layers`), counted from the
end: 0 freezes the whole backbone, 3 trains a ResNet's `layer2`-`layer4` (the SAT tutorial's fine-tuning), None
trains everything. BatchNorm statistics of frozen stages still update in `train()` mode, as in the SAT tutorial.
"""


def _feature_stages(backbone) -> list[dict]:
    info = backbone.feature_info  # a FeatureInfo for features_only models, a list of dicts otherwise
    return list(getattr(info, "info", info))


def backbone_parameter_stages(backbone) -> dict[str, int]:
    """Maps every parameter name of a timm backbone to its feature stage (an index into `feature_info`). A stage owns
    the modules after the previous stage's module up to the end of its own module, so the stem belongs to the first
    stage and modules after the last stage (e.g. Swin's final norm) to the last."""
    # FeatureListNet renames "stages.0" to "stages_0", so names are compared with "." replaced by "_".
    stage_modules = [info["module"].replace(".", "_") for info in _feature_stages(backbone)]
    last_stage = len(stage_modules) - 1
    stage, inside_seen = 0, False
    module_stage = {}
    for module_name, _ in backbone.named_modules():  # pre-order: a stage ends when we leave its module
        name = module_name.replace(".", "_")
        inside = name == stage_modules[stage] or name.startswith(stage_modules[stage] + "_")
        if inside_seen and not inside and stage < last_stage:
            stage, inside_seen = stage + 1, False
            inside = name == stage_modules[stage] or name.startswith(stage_modules[stage] + "_")
        inside_seen = inside_seen or inside
        module_stage[module_name] = stage
    return {name: module_stage[name.rpartition(".")[0]] for name, _ in backbone.named_parameters()}


def freeze_backbone(model, trainable_stages: int | None) -> None:
    """Let only the last `trainable_stages` feature stages of `model.backbone` train (None: all of them); the rest of
    the model is left as it is. A model without a backbone (features only) is left alone."""
    backbone = model.backbone
    if backbone is None:
        return
    num_stages = len(_feature_stages(backbone))
    if trainable_stages is None:
        trainable_stages = num_stages
    if not 0 <= trainable_stages <= num_stages:
        raise ValueError(f"trainable_backbone_stages={trainable_stages}, but backbone {model.config.backbone!r} has "
                         f"{num_stages} feature stages")
    first_trainable = num_stages - trainable_stages
    for name, stage in backbone_parameter_stages(backbone).items():
        backbone.get_parameter(name).requires_grad_(stage >= first_trainable)


__all__ = ["backbone_parameter_stages", "freeze_backbone"]
