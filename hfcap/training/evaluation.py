"""Caption every image of a dataset split and score the captions: ``evaluate_captioner`` and ``hfcap evaluate``.

API
---
``generate_captions(model, processor, dataset, *, accelerator=None, batch_size=32, generate_kwargs=None)
-> dict[int, str]``
    ``image_id -> caption`` for every row of ``dataset`` (columns ``image``, ``image_id``), in dataset order; with
    ``features_dir`` (a feature cache, ``hfcap.training.feature_cache``) from those images' visual features instead. With an
    ``accelerator`` each process captions its shard; sequences are padded across processes and gathered with
    ``gather_for_metrics`` (which drops the duplicates of the uneven last batch), so every process returns the full,
    duplicate-free dict. ``model`` may be wrapped (DDP); ``generate`` runs on the unwrapped model in eval mode.
``evaluate_captioner(model, processor, dataset, *, accelerator=None, batch_size=32, generate_kwargs=None,
output_dir=None, split="test", full_metrics=True) -> dict[str, float]``
    ``generate_captions`` + scores against ``dataset["captions"]``. ``full_metrics=True``: the COCO protocol
    (``hfcap.metrics.compute_caption_metrics``: PTB tokenizer, BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE when its
    jars are present; needs Java). ``full_metrics=False``: ``{"CIDEr-D": ...}`` only, corpus CIDEr-D on
    ``simple_tokenize`` words (no Java, seconds for 5k images; for per-epoch validation). Scored on the main process,
    then broadcast: every process returns the same dict. With ``output_dir`` the main process writes
    ``metrics.json`` ({split, num_images, generate_kwargs, protocol, metrics}; ``protocol`` is ``"coco"`` or
    ``"cider-d-only"``, which ``hfcap push`` puts into the model card), ``metrics.md`` (a markdown table) and the COCO
    results file ``captions_<split>_results.json`` = ``[{"image_id": int, "caption": str}, ...]``.

``generate_kwargs`` go to ``model.generate`` unchanged (``num_beams``, ``max_new_tokens``, ``custom_generate=
hfcap.reference_beam_search`` for the authors' beam search, ...); unset ones come from the model's generation_config.

CLI (configure_parser / run): ``hfcap evaluate --model DIR --split test --output DIR [data flags: --data
scenes|karpathy|coco|folder --karpathy-json JSON --images-root DIR | --coco-annotations JSON --images-root DIR |
--folder DIR (hfcap.data.sources)] [--num-beams K] [--max-new-tokens N] [--reference-beam-search] [--batch-size B]
[--max-images N] [--cider-only]``.
Runs distributed under ``accelerate launch -m hfcap.cli evaluate ...``.
"""

import json
from pathlib import Path

import torch

from hfcap.cli import int_at_least
from hfcap.generation import eos_mask

from .data import make_collate

PROTOCOLS = {True: "coco", False: "cider-d-only"}
"""``full_metrics`` -> the ``protocol`` recorded in metrics.json."""


def generate_captions(model, processor, dataset, *, accelerator=None, batch_size: int = 32,
                      generate_kwargs: dict | None = None, features_dir=None) -> dict[int, str]:
    """``image_id -> generated caption`` for every row of ``dataset``; see the module doc."""
    from tqdm.auto import tqdm

    generate_kwargs = dict(generate_kwargs or {})
    if generate_kwargs.get("num_return_sequences", 1) != 1:
        raise ValueError("evaluation scores one caption per image: do not set num_return_sequences")
    image_ids = [int(i) for i in dataset["image_id"]]
    if len(set(image_ids)) != len(image_ids):
        raise ValueError(f"the dataset has {len(image_ids) - len(set(image_ids))} duplicate image_id values; "
                         "COCO results need one caption per image id")
    if features_dir is not None:  # the images' precomputed visual features, joined by image_id
        from .feature_cache import CachedFeatureDataset

        rows = CachedFeatureDataset(features_dir, dataset.select_columns(["image_id"]))
    else:
        rows = dataset.select_columns(["image", "image_id"])
    loader = torch.utils.data.DataLoader(rows, batch_size=batch_size,
                                         shuffle=False, collate_fn=make_collate(processor, "evaluation"))
    if accelerator is not None:
        from accelerate.data_loader import prepare_data_loader

        # The module function, not accelerator.prepare_data_loader: that one registers every evaluation loader for
        # save_state, so each validation would add a sampler to the checkpoints.
        loader = prepare_data_loader(loader, accelerator.device, num_processes=accelerator.num_processes,
                                     process_index=accelerator.process_index, put_on_device=True)
        model = accelerator.unwrap_model(model)
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    was_training = model.training
    model.eval()
    predictions = {}
    show = accelerator is None or accelerator.is_local_main_process
    try:
        for batch in tqdm(loader, desc="Captioning", unit="batch", disable=not show):
            inputs = {name: value.to(model.device) for name, value in batch.items() if name != "image_id"}
            with torch.no_grad():
                output = model.generate(**inputs, **generate_kwargs)
            sequences = output if torch.is_tensor(output) else output.sequences  # (b, L), starting with bos
            keep, _ = eos_mask(sequences, eos)
            sequences = sequences.masked_fill(~keep, pad)
            ids = batch["image_id"].to(sequences.device)
            if accelerator is not None:
                sequences = accelerator.pad_across_processes(sequences, dim=1, pad_index=pad)
                ids, sequences = accelerator.gather_for_metrics((ids, sequences))
            for image_id, caption in zip(ids.tolist(), processor.batch_decode(sequences, skip_special_tokens=True)):
                predictions[image_id] = caption.strip()
    finally:
        model.train(was_training)
    if len(predictions) != len(image_ids):
        raise RuntimeError(f"captioned {len(predictions)} distinct images but the dataset has {len(image_ids)}")
    return {image_id: predictions[image_id] for image_id in image_ids}


def score_captions(predictions: dict[int, str], references: dict[int, list[str]], *, full_metrics: bool = True
                   ) -> dict[str, float]:
    """COCO metrics (``full_metrics``) or corpus CIDEr-D on ``simple_tokenize`` words only (``{"CIDEr-D": ...}``)."""
    if full_metrics:
        from hfcap.metrics import compute_caption_metrics

        return compute_caption_metrics(predictions, references)
    from hfcap.metrics import cider_d_corpus, simple_tokenize

    ids = list(predictions)
    mean, _ = cider_d_corpus([simple_tokenize(predictions[i]) for i in ids],
                             [[simple_tokenize(ref) for ref in references[i]] for i in ids])
    return {"CIDEr-D": mean}


def evaluate_captioner(model, processor, dataset, *, accelerator=None, batch_size: int = 32,
                       generate_kwargs: dict | None = None, output_dir=None, split: str = "test",
                       full_metrics: bool = True, features_dir=None,
                       remove_consecutive_duplicates: bool = False) -> dict[str, float]:
    """Caption ``dataset`` (columns ``image``, ``captions``, ``image_id``) and score it; see the module doc.
    ``remove_consecutive_duplicates``: M²'s evaluation post-processing ("a a man" -> "a man") before scoring, for
    comparisons with its published numbers (recorded in metrics.json)."""
    predictions = generate_captions(model, processor, dataset, accelerator=accelerator, batch_size=batch_size,
                                    generate_kwargs=generate_kwargs, features_dir=features_dir)
    if remove_consecutive_duplicates:
        from hfcap.models.m2_transformer.modeling_m2_transformer import remove_consecutive_duplicate_words

        predictions = {image_id: remove_consecutive_duplicate_words(caption) for image_id, caption in predictions.items()}
    is_main = accelerator is None or accelerator.is_main_process
    metrics = None
    if is_main:
        references = dict(zip((int(i) for i in dataset["image_id"]), dataset["captions"]))
        metrics = score_captions(predictions, references, full_metrics=full_metrics)
        if output_dir is not None:
            write_results(output_dir, split, predictions, metrics, generate_kwargs or {},
                          protocol=PROTOCOLS[full_metrics], remove_consecutive_duplicates=remove_consecutive_duplicates)
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        metrics = broadcast_object_list([metrics])[0]
    return metrics


def write_results(output_dir, split: str, predictions: dict[int, str], metrics: dict[str, float],
                  generate_kwargs: dict, *, protocol: str, remove_consecutive_duplicates: bool = False) -> Path:
    """Write ``metrics.json``, ``metrics.md`` and ``captions_<split>_results.json`` into ``output_dir``;
    ``protocol`` (a value of ``PROTOCOLS``) says how ``metrics`` were computed."""
    from hfcap.metrics import format_metrics_table

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = [{"image_id": image_id, "caption": caption} for image_id, caption in predictions.items()]
    (output_dir / f"captions_{split}_results.json").write_text(json.dumps(results, indent=1) + "\n")
    settings = {key: value if isinstance(value, (bool, int, float, str, type(None))) else
                getattr(value, "__name__", repr(value)) for key, value in generate_kwargs.items()}
    summary = {"split": split, "num_images": len(predictions), "generate_kwargs": settings, "protocol": protocol,
               "metrics": metrics}
    if remove_consecutive_duplicates:
        summary["postprocessing"] = "remove_consecutive_duplicate_words"
    (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    (output_dir / "metrics.md").write_text(format_metrics_table({split: metrics}) + "\n")
    return output_dir


def configure_parser(parser):
    """Arguments of ``hfcap evaluate``."""
    from hfcap.data.sources import add_data_arguments
    from hfcap.generation import add_generation_arguments

    parser.add_argument("--model", required=True, help="A save_pretrained directory (model + processor).")
    parser.add_argument("--split", default="test", help="Split to evaluate (default: test).")
    parser.add_argument("--output", required=True, help="Folder for metrics.json, metrics.md and the results file.")
    add_data_arguments(parser)
    add_generation_arguments(parser)
    parser.add_argument("--visual-features", metavar="DIR", help="caption from this feature cache (e.g. M2's region "
                        "features, `hfcap data regions`) instead of the images")
    parser.add_argument("--batch-size", type=int_at_least(1), default=32,
                        help="Images per generate call and process (default: 32).")
    parser.add_argument("--max-images", type=int_at_least(1), help="Evaluate only the first N images of the split.")
    parser.add_argument("--remove-consecutive-duplicates", action="store_true",
                        help="M2's evaluation post-processing: drop repeated consecutive words before scoring")
    parser.add_argument("--cider-only", action="store_true",
                        help="Fast mode: corpus CIDEr-D only (no Java, no PTB tokenizer); metrics.json records "
                             "protocol 'cider-d-only' instead of 'coco'.")


def load_evaluation_split(args):
    """The ``datasets.Dataset`` that ``hfcap evaluate`` scores; ValueError when the arguments are incomplete."""
    from hfcap.data.sources import data_source_from_args, load_data_source

    splits = load_data_source(data_source_from_args(args, coco_split=args.split))
    if args.split not in splits:
        raise ValueError(f"split {args.split!r} not found; the dataset has {sorted(splits)}")
    dataset = splits[args.split]
    if len(dataset) == 0:
        raise ValueError(f"split {args.split!r} is empty")
    if args.max_images is not None:
        dataset = dataset.select(range(min(args.max_images, len(dataset))))
    return dataset


def run(args) -> int:
    """``hfcap evaluate``: caption a split, print the metrics table, write the three result files."""
    from accelerate import Accelerator

    from hfcap.generation import generate_kwargs_from_args
    from hfcap.loading import load_captioner
    from hfcap.metrics import format_metrics_table

    accelerator = Accelerator()
    model, processor = load_captioner(args.model, device=accelerator.device)
    dataset = load_evaluation_split(args)
    metrics = evaluate_captioner(model, processor, dataset, accelerator=accelerator, batch_size=args.batch_size,
                                 generate_kwargs=generate_kwargs_from_args(args), output_dir=args.output,
                                 split=args.split, full_metrics=not args.cider_only,
                                 features_dir=args.visual_features,
                                 remove_consecutive_duplicates=args.remove_consecutive_duplicates)
    if accelerator.is_main_process:
        print(format_metrics_table({args.split: metrics}))
        print(f"Wrote metrics.json, metrics.md and captions_{args.split}_results.json to {args.output}")
    return 0
