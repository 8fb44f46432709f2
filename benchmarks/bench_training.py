"""Training-step throughput of hfcap (XE and SCST steps through `hfcap.training`):

    PYTHONPATH=. python benchmarks/bench_training.py --json training.json                 # one GPU, about 3 min
    PYTHONPATH=. accelerate launch --num_processes N benchmarks/bench_training.py --json training_N.json \\
        [--baseline-json training.json]                                                    # N GPUs (DDP)

Setups: full size, random weights, train mode, the authors' per-process batch sizes:
    expansionnet_v2-pixels    end to end, Swin-L/384 + body from pixels (B, 3, 384, 384): XE batch 16 (their stage 3
                              micro-batch), SCST 24 images x 5 samples (stage 6); dropouts 0.1, Swin drop path 0.1
    expansionnet_v2-features  the body on cached Swin features (B, 144, 1536), use_backbone=False (their stages 2 and
                              5): XE 48, SCST 24 x 5
    m2_transformer-regions    the released setting on region features (B, 50, 2048): XE 50 (their batch), SCST 10
                              images x 5 beams (their batch_size // 5), dropout 0.1
Steps, in `--precisions` fp32 and bf16 (Accelerate `mixed_precision`: autocast, fp32 weights):
    xe    the trainer's XE step: `model(**inputs, labels=..., label_smoothing=0.1).loss`, `accelerator.backward`,
          optimiser step (`hfcap.training.trainer.build_optimizer` of a `StageConfig`: RAdam(0.9, 0.98, eps 1e-9) for
          ExpansionNet v2, Adam(0.9, 0.98) for M², as the authors). Labels: 15 random words + EOS. Samples = captions.
    scst  `hfcap.training.scst.scst_step` with each architecture's recipe (scst.py's table: ExpansionNet v2 5 samples,
          mean-of-others baseline, EOS in the reward, per-image df, sequence normalisation; M² the authors' beam search
          with 5 beams, beam-mean baseline, no EOS, per-caption df, max-length normalisation, 20 tokens), then backward
          and the optimiser step. Samples = images. The reward is `ScstReward` over synthetic training references
          (`--train-images` 1,000 images x 5 captions from a word list) scored by hfcap's CiderD (`scst`), and again by
          pycocoevalcap's `CiderScorer` on the same document frequencies (`scst-pycoco`, what M² and
          self-critical.pytorch do; "n/a" when pycocoevalcap is not installed). `reward ms` is the reward's share of
          the step (wall time inside the reward call; the GPU is idle then, since the captions were decoded first).
Timing: `--warmup` steps, then the mean of `--steps` steps (training throughput is a mean, not a best), each between
`torch.cuda.synchronize()` calls. Peak GPU memory per row. Numbers are per process (means over
the processes); `total/s` = per-process samples/s x N. With N > 1 processes each row is also timed inside
`accelerator.no_sync(model)` (no gradient all-reduce): `eff no-sync` = no-sync step time / synced step time on the
same processes (what the all-reduce costs); with `--baseline-json` (a 1-process run's JSON) `eff vs 1` =
per-process samples/s / 1-process samples/s (the scaling efficiency proper). `--time-budget` skips what is left.

`--tiny`: CPU correctness run on tiny configs (one step of every row, both precisions), no timing claims.
"""

import argparse
import copy
import json
import platform
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from hfcap.models import (
    ExpansionNetV2Config,
    ExpansionNetV2ForConditionalGeneration,
    M2TransformerConfig,
    M2TransformerForConditionalGeneration,
)
from hfcap.models.m2_transformer.card import CARD_FACTS as M2_CARD
from hfcap.processing import tokenizer_from_vocabulary
from hfcap.training.config import StageConfig
from hfcap.training.scst import ScstReward, scst_step
from hfcap.training.trainer import build_optimizer, generate_kwargs_of

NEW_TOKENS = 20
CAPTION_WORDS = 15  # XE labels: words + EOS
ENV2_STAGE = dict(optimizer="radam", lr=1e-6, betas=[0.9, 0.98], eps=1e-9, baseline="mean_of_others",
                  include_eos=True, df_mode="per_image", normalisation="sequence")
M2_STAGE = dict(optimizer="adam", lr=1e-6, betas=[0.9, 0.98], baseline="beam_mean", include_eos=False,
                df_mode="per_caption", normalisation="max_length", reference_beam_search=True)
ENV2_DROPOUT = dict(dropout_enc=0.1, dropout_dec=0.1, dropout_enc_input=0.1, dropout_dec_input=0.1, dropout_other=0.1)
ENV2_TOKENS = {"eos_token": (77, "EOS"), "pad_token": (78, "PAD"), "bos_token": (79, "SOS"), "unk_token": (80, "UNK")}
M2_TOKENS = {"unk_token": (0, "<unk>"), "pad_token": (1, "<pad>"), "bos_token": (2, "<bos>"), "eos_token": (3, "<eos>")}

# name -> model class, config, special tokens (id, string), input: `image_size` or `features` (N, D), batch sizes,
# StageConfig fields
FULL = {
    "expansionnet_v2-pixels": dict(
        cls=ExpansionNetV2ForConditionalGeneration, config=ExpansionNetV2Config(**ENV2_DROPOUT), tokens=ENV2_TOKENS,
        image_size=384, xe_batch=16, scst_batch=24, stage=ENV2_STAGE),
    "expansionnet_v2-features": dict(
        cls=ExpansionNetV2ForConditionalGeneration, config=ExpansionNetV2Config(use_backbone=False, **ENV2_DROPOUT),
        tokens=ENV2_TOKENS, features=(144, 1536), xe_batch=48, scst_batch=24, stage=ENV2_STAGE),
    "m2_transformer-regions": dict(
        cls=M2TransformerForConditionalGeneration, config=M2TransformerConfig(**M2_CARD["converted_config"]),
        tokens=M2_TOKENS, features=(50, 2048), xe_batch=50, scst_batch=10, stage=M2_STAGE),
}
_ENV2_TINY = dict(visual_feature_dim=16, d_model=16, num_heads=2, d_ff=32, num_encoder_layers=2, num_decoder_layers=2,
                  static_expansion_groups=[2, 4], num_dynamic_expansions=3, max_position_embeddings=24, vocab_size=120,
                  eos_token_id=77, pad_token_id=78, bos_token_id=79, decoder_start_token_id=79, **ENV2_DROPOUT)
TINY = {
    "expansionnet_v2-pixels": dict(FULL["expansionnet_v2-pixels"], image_size=32, xe_batch=2, scst_batch=2,
                                   config=ExpansionNetV2Config(
        backbone="swin_tiny_patch4_window7_224", **_ENV2_TINY,
        backbone_kwargs={"img_size": 32, "embed_dim": 8, "depths": [2, 1], "num_heads": [1, 2], "window_size": 4})),
    "expansionnet_v2-features": dict(FULL["expansionnet_v2-features"], features=(9, 16), xe_batch=2, scst_batch=2,
                                     config=ExpansionNetV2Config(use_backbone=False, **_ENV2_TINY)),
    "m2_transformer-regions": dict(FULL["m2_transformer-regions"], features=(5, 12), xe_batch=2, scst_batch=2,
                                   config=M2TransformerConfig(
        d_model=16, num_heads=2, head_dim=8, d_ff=32, num_memory_slots=3, num_encoder_layers=3, num_decoder_layers=2,
        max_position_embeddings=24, visual_feature_dim=12, vocab_size=120,
        **{**M2_CARD["converted_config"], "pad_regions_to": 6})),
}

SUBJECTS = "man woman boy girl dog cat horse bird giraffe elephant zebra bus truck car train plane boat pizza".split()
ADJECTIVES = "young old small large white black brown red blue green yellow wooden tall".split()
VERBS = "sitting standing walking riding eating holding looking playing laying flying parked running".split()
PLACES = "table street field beach road grass water snow building kitchen plate park fence tree sky".split()
WORDS = ["a", "the", "is", "on", "in", "near", "with", *SUBJECTS, *ADJECTIVES, *VERBS, *PLACES]

RESULTS = {"meta": {}, "rows": []}
START = time.perf_counter()


# ------------------------------------------------------------------------------------------------------- data


def references(count, seed=0):
    """Synthetic COCO-like training references: `count` images x 5 captions, annotators mostly agreeing on the
    subject and place of their image."""
    rng = random.Random(seed)

    def caption(subject, place):
        words = ["a", rng.choice(ADJECTIVES), subject, "is", rng.choice(VERBS), rng.choice(["on", "in", "near"]),
                 "the", place]
        return " ".join(words + (["with", "a", rng.choice(SUBJECTS)] if rng.random() < 0.5 else []))

    images = []
    for _ in range(count):
        subject, place = rng.choice(SUBJECTS), rng.choice(PLACES)
        images.append([caption(*((subject, place) if rng.random() < 0.7 else (rng.choice(SUBJECTS),
                                                                               rng.choice(PLACES))))
                       for _ in range(5)])
    return images


def tokenizer(vocab_size, special_tokens):
    """A word-level tokenizer of `vocab_size` entries: the special tokens at the authors' ids, the caption words, then
    fillers (random weights sample every id, so every id needs a word)."""
    tokens = [None] * vocab_size
    for index, token in special_tokens.values():
        tokens[index] = token
    pool = iter([*WORDS, *(f"w{i}" for i in range(vocab_size))])
    tokens = [token or next(pool) for token in tokens]
    return tokenizer_from_vocabulary(tokens, **{name: token for name, (_, token) in special_tokens.items()})


class PycocoCider:
    """pycocoevalcap's CiderScorer behind CiderD's `score(candidates, image_indices)`, with the document frequencies
    computed once from the same references (per image, or per caption as M²): what M² and self-critical.pytorch do.
    (compute_cider sets log N from the batch; the work does not depend on it.)"""

    def __init__(self, reward):
        from pycocoevalcap.cider.cider_scorer import CiderScorer

        self.scorer_class = CiderScorer
        self.references = [[" ".join(tokens) for tokens in refs] for refs in reward.references]
        scorer = CiderScorer(n=4, sigma=6.0)
        for refs in self.references:
            if reward.df_mode == "per_image":
                scorer.cook_append(None, refs)
            else:
                for ref in refs:
                    scorer.cook_append(None, [ref])
        scorer.compute_doc_freq()
        self.document_frequency = scorer.document_frequency

    def score(self, candidates, image_indices):
        batch = self.scorer_class(n=4, sigma=6.0)
        for tokens, index in zip(candidates, image_indices):
            batch.cook_append(" ".join(tokens), self.references[index])
        batch.document_frequency = self.document_frequency
        return np.array(batch.compute_cider())


class TimedReward:
    """Wraps a reward to add up the wall time spent inside it."""

    def __init__(self, reward):
        self.reward, self.seconds = reward, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        result = self.reward(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        return result


def make_inputs(spec, batch, device, generator):
    if "image_size" in spec:
        size = spec["image_size"]
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=generator).to(device)}
    return {"visual_features": torch.rand(batch, *spec["features"], generator=generator).to(device)}


def make_labels(config, batch, special_ids, generator, device):
    words = torch.tensor([i for i in range(config.vocab_size) if i not in special_ids][:1000])
    labels = words[torch.randint(len(words), (batch, CAPTION_WORDS + 1), generator=generator)]
    labels[:, -1] = config.eos_token_id
    return labels.to(device)


# ------------------------------------------------------------------------------------------------------ timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, accelerator, model, args, no_sync=False):
    """Mean seconds per step over args.steps steps after args.warmup, and the reward seconds per step (a TimedReward
    inside `step`'s closure is reset through `step.reward`)."""
    device = accelerator.device
    context = (lambda: accelerator.no_sync(model)) if no_sync else nullcontext
    for _ in range(args.warmup):
        with context():
            step()
    if step.reward is not None:
        step.reward.seconds = 0.0
    accelerator.wait_for_everyone()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        with context():
            step()
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    reward = step.reward.seconds / args.steps if step.reward is not None else None
    return seconds, reward


def mean_over_processes(accelerator, value):
    """The mean of `value` over the processes (None where any process has none)."""
    if accelerator.num_processes == 1:
        return value
    value = float("nan") if value is None else float(value)
    mean = accelerator.gather(torch.tensor([value], device=accelerator.device)).mean().item()
    return None if mean != mean else mean


# -------------------------------------------------------------------------------------------------------- main


def bench_setup(name, spec, precision, reward, accelerator, args, baseline):
    """All rows of one setup in one precision: a fresh model and optimiser, prepared by `accelerator`."""
    device, n = accelerator.device, accelerator.num_processes
    torch.manual_seed(accelerator.process_index)
    with torch.device(device):  # initialise on the device: Swin-L's random init is slow on the CPU
        model = spec["cls"](spec["config"]).train()
    stage = StageConfig(type="scst", num_samples=5, max_new_tokens=NEW_TOKENS, **spec["stage"])
    optimizer = build_optimizer(model, stage)
    model, optimizer = accelerator.prepare(model, optimizer)
    config = accelerator.unwrap_model(model).config
    processor = tokenizer(config.vocab_size, spec["tokens"])
    special_ids = {index for index, _ in spec["tokens"].values()}
    generator = torch.Generator().manual_seed(accelerator.process_index)
    xe_inputs = make_inputs(spec, spec["xe_batch"], device, generator)
    labels = make_labels(config, spec["xe_batch"], special_ids, generator, device)
    scst_inputs = make_inputs(spec, spec["scst_batch"], device, generator)
    image_indices = torch.randint(args.train_images, (spec["scst_batch"],), generator=generator).tolist()

    def xe():
        loss = model(**xe_inputs, labels=labels, use_cache=False, label_smoothing=0.1).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    xe.reward = None

    def scst_with(timed_reward):
        def scst():
            loss, _ = scst_step(model, scst_inputs, image_indices, timed_reward, processor=processor,
                                accelerator=accelerator, num_samples=stage.num_samples, baseline=stage.baseline,
                                max_new_tokens=stage.max_new_tokens, normalisation=stage.normalisation,
                                generate_kwargs=generate_kwargs_of(stage))
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scst.reward = timed_reward
        return scst

    steps = {"xe": (xe, spec["xe_batch"]), "scst": (scst_with(TimedReward(reward)), spec["scst_batch"])}
    if args.pycoco:
        pycoco = copy.copy(reward)  # the same reward with pycocoevalcap's scorer in place of hfcap's CiderD
        pycoco.cider = PycocoCider(reward)
        steps["scst-pycoco"] = (scst_with(TimedReward(pycoco)), spec["scst_batch"])
    for step_name, (step, batch) in steps.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        row = dict(setup=name, step=step_name, precision=precision, batch=batch, processes=n)
        seconds = reward_seconds = None
        # every process skips once any is past the budget (DDP processes must run the same steps)
        over = torch.tensor([float(time.perf_counter() - START > args.time_budget)], device=device)
        try:
            if (accelerator.reduce(over, reduction="sum") if n > 1 else over).item():
                raise TimeoutError
            seconds, reward_seconds = time_steps(step, accelerator, model, args)
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            if n > 1:
                row["no_sync_ms"] = 1e3 * mean_over_processes(accelerator, time_steps(
                    step, accelerator, model, args, no_sync=True)[0])
        except TimeoutError:
            row["error"] = "skipped (time budget)"
        except torch.OutOfMemoryError:
            row["error"] = "OOM"
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        except Exception as error:  # reported in the table; the other rows still run
            if args.tiny:
                raise
            row["error"] = f"{type(error).__name__}: {error}"[:200]
            optimizer.zero_grad(set_to_none=True)
        seconds = mean_over_processes(accelerator, seconds)
        reward_seconds = mean_over_processes(accelerator, reward_seconds)
        if seconds:
            row.update(ms=1e3 * seconds, samples_per_s=batch / seconds, total_per_s=n * batch / seconds,
                       reward_ms=None if reward_seconds is None else 1e3 * reward_seconds,
                       reward_share=None if reward_seconds is None else reward_seconds / seconds)
            if "no_sync_ms" in row:
                row["no_sync_efficiency"] = row["no_sync_ms"] / row["ms"]
            base = baseline.get((name, step_name, precision))
            if base:
                row["efficiency_vs_1_process"] = row["samples_per_s"] / base
        RESULTS["rows"].append(row)
        if accelerator.is_main_process:
            print_row(row)
    if not args.pycoco and accelerator.is_main_process:
        row = dict(setup=name, step="scst-pycoco", precision=precision, batch=spec["scst_batch"], processes=n,
                   error="n/a (pycocoevalcap not installed)")
        RESULTS["rows"].append(row)
        print_row(row)
    accelerator.free_memory()  # the prepared model and optimiser: the next setup starts from a clean GPU


def fmt(value, width, digits=1):
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


HEADER = (f"{'setup':<26}{'step':<12}{'precision':<10}{'batch':>6}{'samples/s':>11}{'total/s':>9}{'ms/step':>9}"
          f"{'reward ms':>10}{'reward %':>9}{'peak GiB':>9}{'eff no-sync':>12}{'eff vs 1':>9}")


def print_row(row):
    share = row.get("reward_share")
    print(f"{row['setup']:<26}{row['step']:<12}{row['precision']:<10}{row['batch']:>6}"
          f"{fmt(row.get('samples_per_s'), 11)}{fmt(row.get('total_per_s'), 9)}{fmt(row.get('ms'), 9)}"
          f"{fmt(row.get('reward_ms'), 10)}{fmt(None if share is None else 100 * share, 8)}"
          f"{'%' if share is not None else ' '}{fmt(row.get('peak_gib'), 9, 2)}"
          f"{fmt(row.get('no_sync_efficiency'), 12, 2)}{fmt(row.get('efficiency_vs_1_process'), 9, 2)}"
          f"{'  ' + row['error'] if row.get('error') else ''}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write every number here (main process)")
    parser.add_argument("--setups", nargs="+", default=list(FULL), choices=list(FULL))
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--train-images", type=int, default=1000, help="synthetic training images (x 5 references)")
    parser.add_argument("--time-budget", type=float,
                        help="skip the rows left after this many seconds (default 300; --tiny: none)")
    parser.add_argument("--baseline-json", help="a 1-process run's --json: efficiency vs 1 process")
    parser.add_argument("--tiny", action="store_true", help="CPU correctness run on tiny configs (CI)")
    args = parser.parse_args()
    if args.tiny:
        args.warmup, args.steps, args.train_images = 0, 1, 50
    if args.time_budget is None:
        args.time_budget = float("inf") if args.tiny else 300.0
    try:
        import pycocoevalcap  # noqa: F401
        args.pycoco = True
    except ImportError:
        args.pycoco = False
    specs = {name: (TINY if args.tiny else FULL)[name] for name in args.setups}
    baseline = {}
    if args.baseline_json:
        for row in json.loads(Path(args.baseline_json).read_text())["rows"]:
            if row.get("samples_per_s") and row.get("processes", 1) == 1:
                baseline[(row["setup"], row["step"], row["precision"])] = row["samples_per_s"]

    import accelerate
    import timm
    import transformers

    train_references = references(args.train_images)
    rewards = {}  # (include_eos, df_mode) -> ScstReward: built once (document frequencies, reference vectors)
    for index, precision in enumerate(args.precisions):
        if index:
            AcceleratorState._reset_state()  # Accelerate keeps one mixed-precision setting per process otherwise
        accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no", cpu=args.tiny)
        if index == 0 and accelerator.is_main_process:
            device = accelerator.device
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
            versions = {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "accelerate": accelerate.__version__,
                        "timm": timm.__version__, "pycocoevalcap": "yes" if args.pycoco else "n/a"}
            RESULTS["meta"].update(device=name, processes=accelerator.num_processes, versions=versions, tiny=args.tiny,
                                   settings={k: str(v) for k, v in vars(args).items()})
            print(f"device: {name} x {accelerator.num_processes} process(es); "
                  + ", ".join(f"{k} {v}" for k, v in versions.items()))
            if args.tiny:
                print("--tiny: tiny configs, one step per row; times are not measurements")
            print(f"per-process numbers; mean of {args.steps} steps after {args.warmup} warm-up steps; SCST: "
                  f"{args.train_images:,} synthetic training images x 5 references, {NEW_TOKENS} tokens\n{HEADER}",
                  flush=True)
        for name, spec in specs.items():
            key = (spec["stage"]["include_eos"], spec["stage"]["df_mode"])
            if key not in rewards:
                rewards[key] = ScstReward(train_references, include_eos=key[0], df_mode=key[1])
            bench_setup(name, spec, precision, rewards[key], accelerator, args, baseline)
            if accelerator.is_main_process:
                write_json(args)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return 0
    labels = {"no_sync_efficiency": "no-sync / synced step time (what the all-reduce leaves)",
              "efficiency_vs_1_process": "scaling efficiency: per-process samples/s / 1-process samples/s"}
    for field, label in labels.items():
        values = [row[field] for row in RESULTS["rows"] if row.get(field)]
        if values:
            mean = float(np.exp(np.mean(np.log(values))))
            RESULTS["meta"][f"{field}_geomean"] = mean
            print(f"{label}, {accelerator.num_processes} processes, geometric mean of {len(values)} rows: {mean:.2f}")
    failed = [row for row in RESULTS["rows"] if row.get("error") and not row["error"].startswith(("n/a", "skip"))]
    print(f"\n{len(RESULTS['rows'])} rows, {len(failed)} failed; {time.perf_counter() - START:.0f} s")
    write_json(args)
    return 1 if args.tiny and failed else 0


def write_json(args):
    RESULTS["meta"]["elapsed_s"] = round(time.perf_counter() - START, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=1))


if __name__ == "__main__":
    sys.exit(main())
