"""Captioning throughput of hfcap's models, and how it compares, on one GPU:

    PYTHONPATH=. python benchmarks/bench_captioning.py --models expansionnet_v2 --json env2.json       # ~5 min
    PYTHONPATH=. python benchmarks/bench_captioning.py --models m2_transformer m2_transformer-regions \
        show_attend_tell --no-ved --json m2_sat.json                                                     # ~4 min
    PYTHONPATH=. python benchmarks/bench_captioning.py --cpu-latency --json cpu.json                    # ~2 min
(estimates for an H100/H200; no argument runs everything in one go, cut at `--time-budget`).

Models: full size, random weights (`use_pretrained_backbone=False`), eval mode:
    expansionnet_v2         the default config: Swin-L/384 (144 tokens of 1536), 3 + 3 expansion layers, 10,000 words
    m2_transformer          the default config from pixels: timm ResNet-101 at 224 px (7x7 = 49 grid features)
    m2_transformer-regions  the released setting on bottom-up region features (B, 50, 2048), features only
    show_attend_tell        the default config: ResNet-101 at 256 px pooled to 14x14, LSTM 512, 9,490 words
Every caption is exactly 20 new tokens (`min_new_tokens = max_new_tokens = 20`: random weights would otherwise end
captions at random lengths). The EOS logit is also pushed to -1e4 through the output layer's bias (ExpansionNet v2,
SAT; M²'s has none), because the authors' searches (theirs, `hfcap.reference_beam_search`) take no `min_new_tokens`.

Sections (each prints a table; `--json PATH` gets every number, rewritten after each section):
  captioning  images/s for batch `--batch-sizes` x `--num-beams` (1 = greedy; HF `generate`) x `--precisions`
              (fp32; bf16-autocast = fp32 weights under `torch.autocast(bfloat16)`; bf16-weights = `model.to(bf16)`)
              and input: `pixels` (generate(pixel_values)), `features` (generate(visual_features=...) on features that
              `get_image_features` computed once, as a feature cache does), `regions`. The split: `backbone` =
              `get_image_features`, `encoder` = `get_encoder()(visual_features=...)`, `decode` = generate with the
              precomputed `encoder_outputs`; `peak` = peak GPU memory of the pixels (else features) call. A summary
              gives the bf16/fp32 ratios and says which bf16 mode is faster. ExpansionNet v2 decodes with
              `--decoder-cache` (default `static`: `cache_implementation="static"`, its preallocated state whose
              steps replay a CUDA graph; `dynamic`: the growing cache); the other models have the dynamic one only.
  (a) cache   decoding (from `encoder_outputs`) with and without the cache (`use_cache=False` recomputes the prefix at
              every step), fp32, greedy and the largest beam; the tokens of the two are compared. ExpansionNet v2
              adds its static cache (CUDA-graph steps on a GPU).
  (b) peer    transformers' `VisionEncoderDecoderModel` of comparable size built from local configs (SwinConfig
              Swin-L/384 + a 3-layer 512-wide BERT decoder with cross-attention, 10,000 words, random weights), same
              settings; ratio = hfcap ExpansionNet v2 (pixels) images/s / peer images/s.
  (c) bound   backbone FLOPs per image (`FlopCounterMode`, one image) x measured images/s, as a fraction of the bf16
              matmul peak measured in the same run (8192^3 bf16 matmuls): how far from the hardware each stage runs.
  (d) authors the authors' ExpansionNet v2 code (`--peer-dir`, default benchmarks/.peer_expansionnet_v2: a copy of
              ../shared/peers/expansionnet_v2) on hfcap's weights (the inverse of the converter's `map_key`), their
              `beam_search` (beam 3, 20 new tokens) beside `custom_generate=hfcap.reference_beam_search` and HF beam
              search on the same images, batch `--peer-batch-sizes`, fp32 and bf16 autocast. Correctness: first-step
              log-probs of both on the same images (fp32), and whether their best beams are the same tokens.
  (e) reference  `hfcap.reference_beam_search` (each architecture's authors' search; SAT's decodes one image at a
              time, as the tutorial's) vs HF beam search, largest beam, from `encoder_outputs`, fp32, batch
              `--cache-batch-sizes`; `tokens` = new tokens it decoded (M²'s may end early: no bias to keep EOS out).
  (f) profile  (`--profile`) ExpansionNet v2, bf16 weights, batch 256, beam 3, from pixels: GPU time per stage and the
              top CUDA kernels.
  (g) compile  (`--compile-backbone`) ExpansionNet v2, bf16 weights: the Swin backbone under
              `torch.compile(mode="reduce-overhead")` (fused kernels, CUDA graphs) vs eager, alone and in a full
              beam-3 `generate` from pixels, at each of `--compile-batch-sizes` (compile time printed).
  (h) fused   (`--fused-attention`) ExpansionNet v2, bf16 weights: timm Swin's window attention as explicit matmuls
              + softmax (timm's default for Swin) vs `F.scaled_dot_product_attention` (`TIMM_FUSED_ATTN=2`), the
              backbone alone at each of `--compile-batch-sizes`, and the largest feature difference.
Per model the order is: captioning grid, (c)'s FLOP count, (d), (a), (e), (f); then (b), (h), (g), (c)'s table and
the summary.

Timing: one warm-up call, then the best of `--runs` calls (at least 2; fewer once `--max-seconds` are spent), CUDA
events around each call after the warm-up. fp32 uses PyTorch's defaults (cuDNN convolutions in TF32, matmuls in full
fp32) unless `--tf32`. Once `--time-budget` seconds have passed the remaining measurements are skipped (marked
"skipped") so that the run ends in time; the sections run in order of importance.

Modes:
  --cpu-latency  single-image latency on the CPU (`--threads`, default 2): HF beam 3 and 5 for every model, plus
                 hfcap's reference search and the authors' code for ExpansionNet v2 (their spec: 2.65 s/image at beam
                 5, 20 steps, 2 threads). About 2 min on a 16-core host.
  --tiny         CI correctness run on the CPU with tiny configs: every section and code path (the authors' code if
                 `--peer-dir` exists), one call each, no timing claims; exits 1 if a check fails or a call errors.
Checks (PASS/FAIL lines; exit status 1 if a strict one fails): every generate gives 20 new tokens; the authors' and
hfcap's first-step log-probs agree (fp32); in --tiny also pixels == features == encoder_outputs tokens, cached ==
uncached tokens and the authors' best beams == hfcap's reference beams (on a GPU these are reported, not enforced:
random weights leave near-ties that kernel rounding can flip).
"""

import argparse
import contextlib
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

import hfcap
from hfcap.conversion.expansionnet_v2 import SWIN_L_384, map_key
from hfcap.models import (
    ExpansionNetV2Config,
    ExpansionNetV2ForConditionalGeneration,
    M2TransformerConfig,
    M2TransformerForConditionalGeneration,
    ShowAttendTellConfig,
    ShowAttendTellForConditionalGeneration,
)
from hfcap.models.m2_transformer.card import CARD_FACTS as M2_CARD

NEW_TOKENS = 20
PEER_DIR = Path(__file__).resolve().parent / ".peer_expansionnet_v2"
PRECISIONS = {"fp32": (torch.float32, False), "bf16-autocast": (torch.float32, True),
              "bf16-weights": (torch.bfloat16, False)}  # name -> (weight dtype, autocast)
ENV2 = "expansionnet_v2"

# name -> model class, config, input: `image_size` (pixels) or `regions` (N, D)
FULL = {
    ENV2: dict(cls=ExpansionNetV2ForConditionalGeneration, config=ExpansionNetV2Config(use_pretrained_backbone=False),
               image_size=384),
    "m2_transformer": dict(cls=M2TransformerForConditionalGeneration,
                           config=M2TransformerConfig(use_pretrained_backbone=False), image_size=224),
    "m2_transformer-regions": dict(cls=M2TransformerForConditionalGeneration,
                                   config=M2TransformerConfig(**M2_CARD["converted_config"]), regions=(50, 2048)),
    "show_attend_tell": dict(cls=ShowAttendTellForConditionalGeneration,
                             config=ShowAttendTellConfig(use_pretrained_backbone=False), image_size=256),
}
# tests/model_testers.py's tiny settings (40 words so that beam 5 has candidates to spare)
_M2_TINY = dict(d_model=16, num_heads=2, head_dim=8, d_ff=32, num_memory_slots=3, num_encoder_layers=3,
                num_decoder_layers=2, max_position_embeddings=24, backbone="test_resnet", vocab_size=40)
TINY = {
    ENV2: dict(cls=ExpansionNetV2ForConditionalGeneration, image_size=32, config=ExpansionNetV2Config(
        backbone="swin_tiny_patch4_window7_224",
        backbone_kwargs={"img_size": 32, "embed_dim": 8, "depths": [2, 1], "num_heads": [1, 2], "window_size": 4},
        visual_feature_dim=16, d_model=16, num_heads=2, d_ff=32, num_encoder_layers=2, num_decoder_layers=2,
        static_expansion_groups=[2, 4], num_dynamic_expansions=3, max_position_embeddings=24, vocab_size=40,
        eos_token_id=0, pad_token_id=1, bos_token_id=2, decoder_start_token_id=2)),
    "m2_transformer": dict(cls=M2TransformerForConditionalGeneration, image_size=64,
                           config=M2TransformerConfig(**_M2_TINY, visual_feature_dim=96)),
    "m2_transformer-regions": dict(cls=M2TransformerForConditionalGeneration, regions=(5, 12),
                                   config=M2TransformerConfig(**_M2_TINY, visual_feature_dim=12, **{
                                       **M2_CARD["converted_config"], "pad_regions_to": 6})),
    "show_attend_tell": dict(cls=ShowAttendTellForConditionalGeneration, image_size=32, config=ShowAttendTellConfig(
        backbone="test_resnet", visual_feature_dim=96, encoder_grid_size=2, attention_dim=16, embed_dim=16, d_model=16,
        vocab_size=40, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)),
}

START = time.perf_counter()
RESULTS = {"meta": {}, "rows": [], "checks": []}


# ------------------------------------------------------------------------------------------------------ plumbing


def amp(device, enabled):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def run(fn, args, always=False):
    """Time `fn()`: one warm-up call, then the best of up to `args.runs` calls (>= 2, fewer once `args.max_seconds`
    are spent); --tiny: the warm-up call alone. Returns a namespace (seconds, out, peak GiB, error); error is
    "skipped" once the time budget is spent (unless `always`), "OOM", or the exception's text."""
    device = args.device
    if not always and time.perf_counter() - START > args.time_budget:
        return SimpleNamespace(seconds=None, out=None, peak=None, error="skipped")
    cuda = device.type == "cuda"
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        begin = time.perf_counter()
        out = fn()  # warm-up: allocations, cuBLAS/cuDNN plans, first-call Python work
        if cuda:
            torch.cuda.synchronize(device)
        times = [time.perf_counter() - begin] if args.tiny else []
        while not args.tiny and len(times) < args.runs and (len(times) < 2 or sum(times) < args.max_seconds):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                begin = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - begin)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
        return SimpleNamespace(seconds=min(times), out=out, peak=peak, error=None)
    except torch.OutOfMemoryError:
        return SimpleNamespace(seconds=None, out=None, peak=None, error="OOM")
    except Exception as error:  # reported in the table; the other measurements still run
        if args.tiny:
            raise
        return SimpleNamespace(seconds=None, out=None, peak=None, error=f"{type(error).__name__}: {error}"[:200])
    finally:
        if cuda and torch.cuda.is_available():
            torch.cuda.empty_cache()


def ms(result):
    return None if result is None or result.seconds is None else round(result.seconds * 1e3, 3)


def check(name, passed, detail="", strict=True):
    RESULTS["checks"].append({"name": name, "passed": bool(passed), "strict": strict, "detail": detail})
    label = "PASS" if passed else ("FAIL" if strict else "DIFF")
    print(f"{label}  {name}{'  ' + detail if detail else ''}", flush=True)


def write_json(args):
    RESULTS["meta"]["elapsed_s"] = round(time.perf_counter() - START, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=1))


def fmt(value, width, digits=1):
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def fmt_x(ratio, width):
    """A ratio as `1.23x`, right-aligned in `width`."""
    return f"{'-':>{width}}" if ratio is None else f"{ratio:>{width - 1}.2f}x"


def decoding(beams, **extra):
    """generate kwargs: HF greedy (beams = 1) or beam search forced to exactly NEW_TOKENS new tokens."""
    return dict(num_beams=beams, do_sample=False, min_new_tokens=NEW_TOKENS, max_new_tokens=NEW_TOKENS, **extra)


def decoder_cache(name, args):
    """generate kwargs for the `--decoder-cache` of model `name` (only ExpansionNet v2 has a static one)."""
    return {"cache_implementation": "static"} if name == ENV2 and args.decoder_cache == "static" else {}


def fresh(encoder_outputs):
    """A shallow copy: `generate` repeats the tensors of the encoder_outputs it gets in place (per beam)."""
    return type(encoder_outputs)(**dict(encoder_outputs.items()))


def method_name(beams):
    return "greedy" if beams == 1 else f"beam{beams}"


def build(spec, device):
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: Swin-L's random init is slow on the CPU
        model = spec["cls"](spec["config"]).eval()
    head = model.get_output_embeddings()
    if head.bias is not None:  # see the module doc: the reference searches decode the full NEW_TOKENS too
        with torch.no_grad():
            head.bias[model.config.eos_token_id] = -1e4
    return model


def make_inputs(spec, batch, device, dtype, seed=0):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if "image_size" in spec:
        size = spec["image_size"]
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=generator).to(device, dtype)}
    n, d = spec["regions"]
    return {"visual_features": torch.rand(batch, n, d, generator=generator).to(device, dtype)}


def new_tokens_ok(result):
    return result.out is None or result.out.shape[1] == 1 + NEW_TOKENS


# ------------------------------------------------------------------------------------------------------ sections


def captioning(name, spec, model, args):
    """The main grid; returns nothing, rows go to RESULTS (section "captioning")."""
    device, pixels = args.device, "image_size" in spec
    for precision in args.precisions:
        dtype, autocast = PRECISIONS[precision]
        model.to(dtype)
        for batch in args.batch_sizes:
            inputs = make_inputs(spec, batch, device, dtype)
            with torch.no_grad(), amp(device, autocast):
                backbone = run(lambda: model.get_image_features(inputs["pixel_values"]), args) if pixels else None
                features = {"visual_features": backbone.out} if pixels else inputs
                if pixels and backbone.out is None:
                    features = None
                encoder = run(lambda: model.get_encoder()(**features), args) if features else None
                for beams in args.num_beams:
                    kwargs = decoding(beams, **decoder_cache(name, args))
                    decode = (run(lambda: model.generate(encoder_outputs=fresh(encoder.out), **kwargs), args)
                              if encoder is not None and encoder.out is not None else None)
                    calls = [("pixels", inputs), ("features", features)] if pixels else [("regions", inputs)]
                    outputs = {}
                    for input_name, call_inputs in calls:
                        full = run(lambda: model.generate(**call_inputs, **kwargs), args) if call_inputs else None
                        outputs[input_name] = full
                        row = dict(section="captioning", model=name, input=input_name, precision=precision,
                                   batch=batch, method=method_name(beams), ms=ms(full),
                                   cache=kwargs.get("cache_implementation", "dynamic"),
                                   images_per_s=batch / full.seconds if full and full.seconds else None,
                                   backbone_ms=ms(backbone) if input_name == "pixels" else None,
                                   encoder_ms=ms(encoder), decode_ms=ms(decode),
                                   peak_gib=full.peak if full else None,
                                   error=full.error if full else f"no features ({backbone.error})",
                                   new_tokens_ok=new_tokens_ok(full) if full else True)
                        print_row(row)
                        RESULTS["rows"].append(row)
                    produced = [r.out for r in [*outputs.values(), decode] if r is not None and r.out is not None]
                    if precision == "fp32" and len(produced) > 1:
                        same = all(torch.equal(produced[0], other) for other in produced[1:])
                        check(f"{name} fp32 batch {batch} {method_name(beams)}: "
                              f"{' == '.join([*outputs, 'encoder_outputs'])} tokens", same, strict=args.tiny)
    model.float()


CAPTIONING_HEADER = (f"{'model':<23}{'input':<9}{'precision':<14}{'batch':>5} {'method':<7}{'images/s':>10}"
                     f"{'ms/batch':>10}{'backbone':>9}{'encoder':>9}{'decode':>9}{'peak GiB':>9}")


def print_row(row, suffix=""):
    line = (f"{row['model']:<23}{row['input']:<9}{row['precision']:<14}{row['batch']:>5} {row['method']:<7}"
            f"{fmt(row['images_per_s'], 10)}{fmt(row['ms'], 10)}{fmt(row.get('backbone_ms'), 9)}"
            f"{fmt(row.get('encoder_ms'), 9)}{fmt(row.get('decode_ms'), 9)}{fmt(row.get('peak_gib'), 9, 2)}")
    print(line + suffix + (f"  {row['error']}" if row.get("error") else ""), flush=True)


def decoding_variants(name, spec, model, args):
    """(a) decoding with vs without the cache, greedy and the largest beam, and (e) `hfcap.reference_beam_search` (each
    architecture's authors' search; SAT's decodes one image at a time, as the tutorial's) vs HF beam search at the
    largest beam: all from precomputed encoder outputs, fp32."""
    static = name == ENV2
    print(f"\n(a) {name}: decoding from encoder_outputs, fp32, cached vs use_cache=False"
          + (" (static = the static cache, CUDA-graph steps on a GPU)" if static else "") + "\n"
          f"{'model':<23}{'batch':>5} {'method':<7}{'cached ms':>11}{'uncached ms':>12}{'ratio':>9}"
          + (f"{'static ms':>11}{'uncached/static':>16}" if static else ""))
    largest, references = max(args.num_beams), []
    for batch in args.cache_batch_sizes:
        inputs = make_inputs(spec, batch, args.device, torch.float32)
        with torch.no_grad():
            features = {"visual_features": model.get_image_features(inputs["pixel_values"])} if "image_size" in spec \
                else inputs
            encoder_outputs = model.get_encoder()(**features)
            for beams in sorted({1, largest}):
                cached = run(lambda: model.generate(encoder_outputs=fresh(encoder_outputs), **decoding(beams)), args)
                uncached = run(lambda: model.generate(encoder_outputs=fresh(encoder_outputs),
                                                      **decoding(beams, use_cache=False)), args)
                static_cache = run(lambda: model.generate(encoder_outputs=fresh(encoder_outputs),
                                                          **decoding(beams, cache_implementation="static")), args) \
                    if static else None
                ratio = uncached.seconds / cached.seconds if cached.seconds and uncached.seconds else None
                same = None if cached.out is None or uncached.out is None else torch.equal(cached.out, uncached.out)
                static_ratio = (uncached.seconds / static_cache.seconds
                                if static and static_cache.seconds and uncached.seconds else None)
                static_same = (torch.equal(cached.out, static_cache.out)
                               if static and cached.out is not None and static_cache.out is not None else None)
                row = dict(section="cache", model=name, batch=batch, method=method_name(beams), cached_ms=ms(cached),
                           uncached_ms=ms(uncached), ratio=ratio, tokens_equal=same,
                           static_ms=ms(static_cache), uncached_over_static=static_ratio,
                           static_tokens_equal=static_same,
                           error=cached.error or uncached.error or (static_cache.error if static else None),
                           new_tokens_ok=all(new_tokens_ok(r) for r in (cached, uncached, static_cache) if r))
                RESULTS["rows"].append(row)
                print(f"{name:<23}{batch:>5} {method_name(beams):<7}{fmt(row['cached_ms'], 11, 2)}"
                      f"{fmt(row['uncached_ms'], 12, 2)}{fmt_x(ratio, 9)}"
                      + (f"{fmt(row['static_ms'], 11, 2)}{fmt_x(static_ratio, 16)}" if static else "")
                      + f"  tokens equal: {same}" + (f", static: {static_same}" if static else "")
                      + f"{'  ' + row['error'] if row['error'] else ''}", flush=True)
                if same is not None:
                    check(f"{name} batch {batch} {method_name(beams)}: cached == uncached tokens", same,
                          strict=args.tiny)
                if static_same is not None:
                    check(f"{name} batch {batch} {method_name(beams)}: static == dynamic cache tokens", static_same,
                          strict=args.tiny)
            reference = run(lambda: model.generate(
                encoder_outputs=fresh(encoder_outputs), num_beams=largest, max_new_tokens=NEW_TOKENS,
                do_sample=False, custom_generate=hfcap.reference_beam_search), args)
        references.append((batch, cached, reference))  # `cached` is HF beam search at the largest beam

    print(f"\n(e) {name}: hfcap.reference_beam_search (the authors' search) vs HF beam search, from "
          f"encoder_outputs, fp32\n{'model':<23}{'batch':>5} {'method':<7}{'HF ms':>9}{'reference ms':>14}"
          f"{'ref img/s':>10}{'ref/HF':>9}{'tokens':>8}")
    for batch, hf, reference in references:
        tokens = None
        if reference.out is not None:  # M²'s output layer has no bias to keep EOS out: say what was decoded
            tokens = (reference.out[:, 1:] != model.config.pad_token_id).sum(1).float().mean().item()
        ratio = reference.seconds / hf.seconds if hf.seconds and reference.seconds else None
        row = dict(section="reference", model=name, batch=batch, beams=largest, hf_ms=ms(hf),
                   reference_ms=ms(reference), reference_over_hf=ratio, reference_tokens=tokens,
                   images_per_s=batch / reference.seconds if reference.seconds else None,
                   error=hf.error or reference.error)
        RESULTS["rows"].append(row)
        print(f"{name:<23}{batch:>5} {f'beam{largest}':<7}{fmt(row['hf_ms'], 9)}{fmt(row['reference_ms'], 14)}"
              f"{fmt(row['images_per_s'], 10)}{fmt_x(ratio, 9)}{fmt(tokens, 8)}"
              f"{'  ' + row['error'] if row['error'] else ''}", flush=True)


def backbone_flops(spec, model, device):
    """(c) FLOPs of the backbone stage for one image (matmuls, convolutions, attention: what FlopCounterMode counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    image = make_inputs(spec, 1, device, torch.float32)["pixel_values"]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.get_image_features(image)
    return counter.get_total_flops()


def matmul_peak(args):
    """(c) bf16 matmul throughput, TFLOP/s: the best of 10 chained n^3 products (n = 8192; 512 in --tiny)."""
    n = 512 if args.tiny else 8192
    a = torch.randn(n, n, device=args.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=args.device, dtype=torch.bfloat16)
    result = run(lambda: [a @ b for _ in range(10)], args, always=True)
    return 10 * 2 * n**3 / result.seconds / 1e12


def bound_table(peak_tflops, flops, args):
    """(c) achieved backbone FLOP/s of the measured rows, as a fraction of the bf16 matmul peak."""
    print(f"\n(c) hardware bound: backbone FLOPs per image x images/s vs the bf16 matmul peak "
          f"{peak_tflops:.0f} TFLOP/s (measured above)")
    print(f"{'model':<23}{'GFLOP/img':>10} {'what':<28}{'precision':<14}{'batch':>5}{'images/s':>10}{'TFLOP/s':>9}"
          f"{'% peak':>8}")
    largest = max(args.batch_sizes)
    for name, per_image in flops.items():
        for precision in args.precisions:
            stages = [("backbone only", "backbone_ms", "greedy"), ("caption greedy (pixels)", "ms", "greedy"),
                      (f"caption {method_name(max(args.num_beams))} (pixels)", "ms", method_name(max(args.num_beams)))]
            for what, field, method in stages:
                row = next((r for r in RESULTS["rows"] if r["section"] == "captioning" and r["model"] == name
                            and r["input"] == "pixels" and r["precision"] == precision and r["batch"] == largest
                            and r["method"] == method), None)
                if row is None or row[field] is None:
                    continue
                images_per_s = largest / (row[field] / 1e3)
                achieved = per_image * images_per_s / 1e12
                RESULTS["rows"].append(dict(section="bound", model=name, what=what, precision=precision,
                                            batch=largest, images_per_s=images_per_s, gflop_per_image=per_image / 1e9,
                                            tflops=achieved, fraction_of_peak=achieved / peak_tflops))
                print(f"{name:<23}{per_image / 1e9:>10.1f} {what:<28}{precision:<14}{largest:>5}{images_per_s:>10.1f}"
                      f"{achieved:>9.1f}{100 * achieved / peak_tflops:>7.1f}%")


def build_ved(args):
    """(b) transformers' VisionEncoderDecoderModel: HF Swin-L/384 + a 3-layer BERT decoder of ExpansionNet v2's size."""
    from transformers import BertConfig, SwinConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    if args.tiny:
        encoder = SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[2, 1], num_heads=[1, 2], window_size=4)
        decoder = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    else:
        encoder = SwinConfig(image_size=384, patch_size=4, embed_dim=192, depths=[2, 2, 18, 2],
                             num_heads=[6, 12, 24, 48], window_size=12)
        decoder = dict(vocab_size=10000, hidden_size=512, num_hidden_layers=3, num_attention_heads=8,
                       intermediate_size=2048)
    decoder = BertConfig(**decoder, max_position_embeddings=74, is_decoder=True, add_cross_attention=True)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    tokens = dict(decoder_start_token_id=2, pad_token_id=1, eos_token_id=0)  # as ExpansionNet v2's (SOS, PAD, EOS)
    for key, value in tokens.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = VisionEncoderDecoderModel(config=config).eval()
    model.generation_config.update(**tokens)
    return model


def ved_section(args, image_size):
    model = build_ved(args)
    print(f"peer: VisionEncoderDecoderModel(SwinModel Swin-L/384, BERT 3x512 decoder), "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters (hfcap ExpansionNet v2 ratio = hfcap "
          "images/s / peer images/s, pixels)")
    print(CAPTIONING_HEADER + f"{'hfcap/peer':>11}")
    device = args.device
    for precision in args.precisions:
        dtype, autocast = PRECISIONS[precision]
        model.to(dtype)
        for batch in args.batch_sizes:
            pixel_values = make_inputs({"image_size": image_size}, batch, device, dtype)["pixel_values"]
            with torch.no_grad(), amp(device, autocast):
                encoder = run(lambda: model.encoder(pixel_values=pixel_values), args)
                for beams in args.num_beams:
                    kwargs = decoding(beams)
                    decode = (run(lambda: model.generate(encoder_outputs=fresh(encoder.out), **kwargs), args)
                              if encoder.out is not None else None)
                    full = run(lambda: model.generate(pixel_values=pixel_values, **kwargs), args)
                    ours = next((r for r in RESULTS["rows"] if r["section"] == "captioning" and r["model"] == ENV2
                                 and r["input"] == "pixels" and r["precision"] == precision and r["batch"] == batch
                                 and r["method"] == method_name(beams)), None)
                    images_per_s = batch / full.seconds if full.seconds else None
                    ratio = ours["images_per_s"] / images_per_s if ours and ours["images_per_s"] and images_per_s \
                        else None
                    row = dict(section="peer", model="VisionEncoderDecoder", input="pixels", precision=precision,
                               batch=batch, method=method_name(beams), ms=ms(full), images_per_s=images_per_s,
                               backbone_ms=ms(encoder), encoder_ms=None, decode_ms=ms(decode), peak_gib=full.peak,
                               error=full.error, hfcap_over_peer=ratio, new_tokens_ok=new_tokens_ok(full))
                    RESULTS["rows"].append(row)
                    print_row(row, fmt_x(ratio, 11))


# --------------------------------------------------------------------------------------- (d) the authors' code


def build_peer(model, peer_dir, device):
    """The authors' End_ExpansionNet_v2 with `model`'s config (their Swin arguments: SWIN_L_384 + backbone_kwargs, as
    the converter reads them) and `model`'s weights, mapped by the converter's `map_key` (their key -> ours)."""
    if str(peer_dir) not in sys.path:
        sys.path.insert(0, str(peer_dir))
    # their code indexes with lists of tensors and calls meshgrid without `indexing`: deprecated, still the same result
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
    warnings.filterwarnings("ignore", message="torch.meshgrid: in an upcoming release")
    from models.End_ExpansionNet_v2 import End_ExpansionNet_v2  # the authors' top-level `models` package

    c = model.config
    swin = {**SWIN_L_384, **(c.backbone_kwargs or {})}
    words = {f"w{i}": i for i in range(c.vocab_size)}  # only its size matters
    with torch.device(device):
        peer = End_ExpansionNet_v2(
            swin_img_size=swin["img_size"], swin_patch_size=swin["patch_size"], swin_in_chans=swin["in_chans"],
            swin_embed_dim=swin["embed_dim"], swin_depths=swin["depths"], swin_num_heads=swin["num_heads"],
            swin_window_size=swin["window_size"], swin_mlp_ratio=swin["mlp_ratio"], swin_qkv_bias=swin["qkv_bias"],
            swin_qk_scale=None, swin_drop_rate=0.0, swin_attn_drop_rate=0.0, swin_drop_path_rate=0.0,
            swin_norm_layer=torch.nn.LayerNorm, swin_ape=False, swin_patch_norm=True, swin_use_checkpoint=False,
            final_swin_dim=c.visual_feature_dim, d_model=c.d_model, N_enc=c.num_encoder_layers,
            N_dec=c.num_decoder_layers, ff=c.d_ff, num_heads=c.num_heads,
            num_exp_enc_list=list(c.static_expansion_groups), num_exp_dec=c.num_dynamic_expansions,
            output_word2idx=words, output_idx2word=list(words), max_seq_len=c.max_position_embeddings,
            drop_args=SimpleNamespace(enc=0.0, dec=0.0, enc_input=0.0, dec_input=0.0, other=0.0),
            rank=device)  # their code moves every mask to `rank` (spec §13)
    ours, theirs = model.state_dict(), peer.state_dict()
    targets = {key: map_key(key) for key in theirs}  # None: Swin buffers both sides recompute
    unused = set(ours) - set(targets.values())
    if unused:
        raise ValueError(f"hfcap tensors without a counterpart in the authors' model: {sorted(unused)[:5]}")
    peer.load_state_dict({key: theirs[key] if target is None else ours[target] for key, target in targets.items()})
    return peer.eval()


@contextlib.contextmanager
def no_tf32():
    """True fp32 matmuls and convolutions while the two implementations are compared (TF32 would blur it)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def peer_beam_search(peer, pixel_values, beams, config):
    """Their `beam_search` (captioning_model.py): `beam_max_seq_len` counts SOS, so NEW_TOKENS + 1."""
    return peer(enc_x=pixel_values, enc_x_num_pads=[0] * len(pixel_values), mode="beam_search",
                sos_idx=config.decoder_start_token_id, eos_idx=config.eos_token_id, beam_size=beams,
                how_many_outputs=1, beam_max_seq_len=NEW_TOKENS + 1)


def same_best_beams(theirs, ours):
    """Images whose best beam is the same token list (theirs: lists with SOS and EOS; ours: padded ids with start)."""
    return sum(ours[i, : len(caption[0])].tolist() == caption[0] for i, caption in enumerate(theirs[0]))


def authors_section(model, spec, args):
    device, config = args.device, model.config
    peer = build_peer(model, args.peer_dir, device)
    beams = 3
    # Correctness, cheaply: the first decoding step's log-probs on the same two images, fp32.
    pixel_values = make_inputs(spec, 2, device, torch.float32, seed=1)["pixel_values"]
    start = torch.full((2, 1), config.decoder_start_token_id, device=device)
    with torch.no_grad(), no_tf32():
        theirs = peer.forward_dec(peer.forward_enc(pixel_values, [0, 0]), [0, 0], start, [0, 0],
                                  apply_log_softmax=True)[:, 0]
        ours = model(pixel_values=pixel_values, decoder_input_ids=start).logits[:, 0].float().log_softmax(-1)
    difference = (theirs.float() - ours).abs().max().item()
    RESULTS["meta"]["authors_first_step_logprob_max_abs_diff"] = difference
    check("authors' vs hfcap first-step log-probs, fp32, 2 images", difference < 1e-3, f"max |diff| {difference:.2e}")

    print(f"\n{'batch':>5} {'precision':<14}{'search (beam 3, 20 tokens)':<30}{'images/s':>10}{'ms/batch':>11}"
          f"{'peak GiB':>9}{'vs authors':>11}")
    for batch in args.peer_batch_sizes:
        pixel_values = make_inputs(spec, batch, device, torch.float32)["pixel_values"]
        for precision in ("fp32", "bf16-autocast"):
            with torch.no_grad(), amp(device, PRECISIONS[precision][1]):
                searches = {
                    "authors' beam_search": lambda: peer_beam_search(peer, pixel_values, beams, config),
                    "hfcap reference_beam_search": lambda: model.generate(
                        pixel_values=pixel_values, num_beams=beams, max_new_tokens=NEW_TOKENS, do_sample=False,
                        custom_generate=hfcap.reference_beam_search),
                    "HF beam search": lambda: model.generate(pixel_values=pixel_values, **decoding(beams)),
                }
                results = {label: run(fn, args) for label, fn in searches.items()}
            authors = results["authors' beam_search"]
            for label, result in results.items():
                ratio = authors.seconds / result.seconds if authors.seconds and result.seconds else None
                row = dict(section="authors", model=ENV2, batch=batch, precision=precision, search=label, beams=beams,
                           ms=ms(result), images_per_s=batch / result.seconds if result.seconds else None,
                           peak_gib=result.peak, speedup_vs_authors=ratio, error=result.error)
                RESULTS["rows"].append(row)
                print(f"{batch:>5} {precision:<14}{label:<30}{fmt(row['images_per_s'], 10)}{fmt(row['ms'], 11)}"
                      f"{fmt(row['peak_gib'], 9, 2)}{fmt_x(ratio, 11)}{'  ' + row['error'] if row['error'] else ''}",
                      flush=True)
            reference = results["hfcap reference_beam_search"].out
            if precision == "fp32" and authors.out is not None and reference is not None:
                same = same_best_beams(authors.out, reference)
                check(f"authors' vs hfcap reference best beam, fp32, batch {batch}", same == batch,
                      f"{same}/{batch} images identical", strict=args.tiny)
                check(f"hfcap reference search decoded {NEW_TOKENS} tokens, batch {batch}",
                      reference.shape[1] == NEW_TOKENS + 1, strict=True)


# ---------------------------------------------------------------------------------------------- --cpu-latency


def profile_section(name, spec, model, args, batch=256, beams=3):
    """(f) Where the time of the headline setting goes, bf16 weights, from pixels: GPU time of each stage (CUDA events,
    as the grid times them) and the top CUDA kernels of one whole `generate` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    model.to(torch.bfloat16)
    inputs = make_inputs(spec, batch, args.device, torch.bfloat16)
    kwargs = decoding(beams, **decoder_cache(name, args))
    with torch.no_grad():
        backbone = run(lambda: model.get_image_features(inputs["pixel_values"]), args, always=True)
        encoder = run(lambda: model.get_encoder()(visual_features=backbone.out), args, always=True)
        decode = run(lambda: model.generate(encoder_outputs=fresh(encoder.out), **kwargs), args, always=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model.generate(**inputs, **kwargs)
            torch.cuda.synchronize(args.device)
    model.float()
    stages = {"backbone": ms(backbone), "encoder": ms(encoder), "decoding": ms(decode)}
    total = sum(value for value in stages.values() if value)
    cache = kwargs.get("cache_implementation", "dynamic")
    print(f"\n(f) profile: {name}, bf16 weights, batch {batch}, beam {beams}, {cache} cache, from pixels; "
          "GPU time by stage: "
          + ", ".join(f"{stage} {fmt(value, 0, 1)} ms ({value / total:.0%})" if value else f"{stage} -"
                      for stage, value in stages.items()))
    kernels = sorted((e for e in prof.key_averages() if e.device_time_total > 0),
                     key=lambda e: e.device_time_total, reverse=True)[:15]
    print(f"{'CUDA kernel (top 15 by GPU time)':<90}{'ms':>9}{'calls':>8}")
    for event in kernels:
        print(f"{event.key[:88]:<90}{event.device_time_total / 1e3:>9.1f}{event.count:>8}")
    RESULTS["meta"]["profile"] = {"setting": f"{name} bf16-weights batch {batch} beam {beams}", "stages_ms": stages,
                                  "top_kernels": [(e.key, e.device_time_total / 1e3, e.count) for e in kernels]}


def compile_section(name, spec, model, args, beams=3):
    """(g) The backbone under `torch.compile(mode="reduce-overhead")` (inductor's fused kernels, replayed as CUDA
    graphs) vs eager, bf16 weights: `get_image_features` alone and a full `generate` from pixels (HF beam search and
    `hfcap.reference_beam_search`)."""
    print(f"\n(g) {name}: backbone compiled with mode=\"reduce-overhead\" vs eager, bf16 weights, beam {beams}, "
          f"from pixels, {args.decoder_cache} decoder cache\n{'batch':>5} {'search':<10}{'compile s':>10}"
          f"{'eager bb ms':>12}{'compiled bb ms':>15}{'speed-up':>9}{'eager img/s':>12}{'compiled img/s':>15}"
          f"{'speed-up':>9}")
    model.to(torch.bfloat16)
    backbone = model.get_encoder().backbone
    searches = {"HF": decoding(beams, **decoder_cache(name, args)),
                "reference": dict(num_beams=beams, max_new_tokens=NEW_TOKENS, do_sample=False,
                                  custom_generate=hfcap.reference_beam_search, **decoder_cache(name, args))}
    try:
        for batch in args.compile_batch_sizes:
            if time.perf_counter() - START > args.time_budget:
                break
            pixel_values = make_inputs(spec, batch, args.device, torch.bfloat16)["pixel_values"]
            with torch.no_grad():
                eager = run(lambda: model.get_image_features(pixel_values), args)
                eager_full = {search: run(lambda: model.generate(pixel_values=pixel_values, **kwargs), args)
                              for search, kwargs in searches.items()}
                backbone.forward_features = torch.compile(
                    type(backbone).forward_features.__get__(backbone), mode="reduce-overhead", dynamic=False)
                begin = time.perf_counter()
                model.get_image_features(pixel_values)  # compiles for this batch size, records the graph
                torch.cuda.synchronize(args.device)
                compile_s = time.perf_counter() - begin
                compiled = run(lambda: model.get_image_features(pixel_values), args)
                compiled_full = {search: run(lambda: model.generate(pixel_values=pixel_values, **kwargs), args)
                                 for search, kwargs in searches.items()}
                del backbone.forward_features  # back to the eager method
            for search in searches:
                before, after = eager_full[search], compiled_full[search]
                same = (None if before.out is None or after.out is None
                        else (before.out == after.out).all(dim=1).float().mean().item())
                speed = [a.seconds / b.seconds if a.seconds and b.seconds else None
                         for a, b in ((eager, compiled), (before, after))]
                row = dict(section="compile", model=name, batch=batch, method=method_name(beams), search=search,
                           compile_s=compile_s, eager_backbone_ms=ms(eager), compiled_backbone_ms=ms(compiled),
                           backbone_speedup=speed[0], eager_ms=ms(before), compiled_ms=ms(after),
                           eager_images_per_s=batch / before.seconds if before.seconds else None,
                           compiled_images_per_s=batch / after.seconds if after.seconds else None,
                           speedup=speed[1], equal_sequences=same,
                           error=eager.error or compiled.error or before.error or after.error)
                RESULTS["rows"].append(row)
                print(f"{batch:>5} {search:<10}{fmt(compile_s, 10)}{fmt(row['eager_backbone_ms'], 12, 2)}"
                      f"{fmt(row['compiled_backbone_ms'], 15, 2)}{fmt_x(speed[0], 9)}"
                      f"{fmt(row['eager_images_per_s'], 12)}{fmt(row['compiled_images_per_s'], 15)}"
                      f"{fmt_x(speed[1], 9)}  equal sequences: {same}{'  ' + row['error'] if row['error'] else ''}",
                      flush=True)
    finally:
        backbone.__dict__.pop("forward_features", None)
        model.float()


def fused_attention_section(name, spec, model, args):
    """(h) timm's Swin computes window attention with explicit matmuls and a softmax unless `TIMM_FUSED_ATTN=2`
    (its `fused_attn`, "experimental" for Swin): the backbone alone with each, bf16 weights, at `--compile-batch-sizes`,
    and how far the two features differ."""
    print(f"\n(h) {name}: timm Swin window attention, explicit (default) vs F.scaled_dot_product_attention "
          f"(TIMM_FUSED_ATTN=2), backbone only, bf16 weights\n{'batch':>5}{'explicit ms':>13}{'SDPA ms':>10}"
          f"{'speed-up':>10}{'max |feature diff|':>20}")
    model.to(torch.bfloat16)
    modules = [m for m in model.get_encoder().backbone.modules() if hasattr(m, "fused_attn")]
    try:
        for batch in args.compile_batch_sizes:
            pixel_values = make_inputs(spec, batch, args.device, torch.bfloat16)["pixel_values"]
            timings = {}
            with torch.no_grad():
                for fused in (False, True):
                    for module in modules:
                        module.fused_attn = fused
                    timings[fused] = run(lambda: model.get_image_features(pixel_values), args)
            difference = (None if timings[False].out is None or timings[True].out is None else
                          (timings[False].out.float() - timings[True].out.float()).abs().max().item())
            speed = (timings[False].seconds / timings[True].seconds
                     if timings[False].seconds and timings[True].seconds else None)
            row = dict(section="fused_attention", model=name, batch=batch, explicit_ms=ms(timings[False]),
                       sdpa_ms=ms(timings[True]), speedup=speed, max_feature_difference=difference,
                       error=timings[False].error or timings[True].error)
            RESULTS["rows"].append(row)
            print(f"{batch:>5}{fmt(row['explicit_ms'], 13, 2)}{fmt(row['sdpa_ms'], 10, 2)}{fmt_x(speed, 10)}"
                  f"{fmt(difference, 20, 4)}{'  ' + row['error'] if row['error'] else ''}", flush=True)
    finally:
        for module in modules:
            module.fused_attn = False
        model.float()


def cpu_latency(args, specs):
    print(f"\nsingle-image latency on the CPU, {torch.get_num_threads()} threads, fp32, {NEW_TOKENS} new tokens "
          "(authors' spec: their ExpansionNet v2 code, beam 5, 2 threads: 2.65 s/image)")
    print(f"{'model':<23}{'input':<9}{'search':<30}{'beams':>5}{'s/image':>10}")
    device = torch.device("cpu")
    cpu_args = SimpleNamespace(**{**vars(args), "device": device})
    for name, spec in specs.items():
        model = build(spec, device)
        inputs = make_inputs(spec, 1, device, torch.float32)
        peer = build_peer(model, args.peer_dir, device) if name == ENV2 and args.peer_dir.is_dir() else None
        for beams in [b for b in args.num_beams if b > 1]:
            searches = {"HF beam search": lambda: model.generate(**inputs, **decoding(beams))}
            if name == ENV2:
                searches["HF beam search, static cache"] = lambda: model.generate(
                    **inputs, **decoding(beams, cache_implementation="static"))
                searches["hfcap reference_beam_search"] = lambda: model.generate(
                    **inputs, num_beams=beams, max_new_tokens=NEW_TOKENS, do_sample=False,
                    custom_generate=hfcap.reference_beam_search)
                if peer is not None:
                    searches["authors' beam_search"] = lambda: peer_beam_search(
                        peer, inputs["pixel_values"], beams, model.config)
            for label, fn in searches.items():
                with torch.no_grad():
                    result = run(fn, cpu_args)
                kind = "pixels" if "image_size" in spec else "regions"
                row = dict(section="cpu_latency", model=name, input=kind, search=label, beams=beams,
                           seconds=result.seconds, threads=torch.get_num_threads(), error=result.error)
                RESULTS["rows"].append(row)
                print(f"{name:<23}{kind:<9}{label:<30}{beams:>5}"
                      f"{fmt(result.seconds, 10, 3)}{'  ' + result.error if result.error else ''}", flush=True)
        write_json(args)


# ---------------------------------------------------------------------------------------------------------- main


def header(args):
    import accelerate
    import timm
    import transformers

    device = args.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "timm": timm.__version__,
                "accelerate": accelerate.__version__, "cuda": torch.version.cuda}
    RESULTS["meta"].update(device=name, versions=versions, tiny=args.tiny, new_tokens=NEW_TOKENS,
                           settings={k: str(v) for k, v in vars(args).items()})
    print(f"device: {name}; " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if device.type == "cuda":
        print(f"TF32: cuDNN convolutions {torch.backends.cudnn.allow_tf32}, matmuls "
              f"{torch.backends.cuda.matmul.allow_tf32}; cudnn.benchmark {torch.backends.cudnn.benchmark}")
    if args.tiny:
        print("--tiny: tiny configs, one call per measurement; times are not measurements")
    print(f"{NEW_TOKENS} new tokens per caption; best of <= {args.runs} runs after a warm-up; time budget "
          f"{args.time_budget:.0f} s", flush=True)


def summary(args):
    """bf16 vs fp32 ratios of the captioning grid, and which bf16 mode wins."""
    rows = [r for r in RESULTS["rows"] if r["section"] == "captioning" and r["images_per_s"]]
    speed = {(r["model"], r["input"], r["batch"], r["method"], r["precision"]): r["images_per_s"] for r in rows}
    keys = sorted({k[:4] for k in speed}, key=lambda k: (k[0], k[1], k[2], k[3]))
    print(f"\nsummary: images/s and ratios\n{'model':<23}{'input':<9}{'batch':>5} {'method':<7}{'fp32':>9}"
          f"{'bf16-ac':>9}{'bf16-w':>9}{'ac/fp32':>8}{'w/ac':>7}")
    log_ratios = {}  # batch -> log(bf16 weights / autocast images/s)
    for key in keys:
        fp32, ac, w = (speed.get((*key, p)) for p in ("fp32", "bf16-autocast", "bf16-weights"))
        ac_ratio = ac / fp32 if ac and fp32 else None
        w_ratio = w / ac if w and ac else None
        if w_ratio:
            log_ratios.setdefault(key[2], []).append(math.log(w_ratio))
        print(f"{key[0]:<23}{key[1]:<9}{key[2]:>5} {key[3]:<7}{fmt(fp32, 9)}{fmt(ac, 9)}{fmt(w, 9)}"
              f"{fmt_x(ac_ratio, 8)}{fmt_x(w_ratio, 7)}")
    for batch, logs in sorted(log_ratios.items()):
        geomean = math.exp(sum(logs) / len(logs))
        verdict = ("bf16 weights clearly faster" if geomean > 1.1 else
                   "bf16 autocast clearly faster" if geomean < 1 / 1.1 else "within 10%")
        RESULTS["meta"].setdefault("bf16_weights_over_autocast_geomean", {})[batch] = geomean
        print(f"batch {batch}: bf16 weights / bf16 autocast images/s, geometric mean over {len(logs)} settings "
              f"{geomean:.2f}x: {'(--tiny: not a measurement)' if args.tiny else verdict}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--num-beams", type=int, nargs="+", default=[1, 3, 5], help="1 = greedy")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--models", nargs="+", default=list(FULL), choices=list(FULL))
    parser.add_argument("--cache-batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--peer-batch-sizes", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--peer-dir", type=Path, default=PEER_DIR, help="the authors' ExpansionNet v2 model code")
    parser.add_argument("--no-ved", action="store_true", help="skip (b), the VisionEncoderDecoderModel peer")
    parser.add_argument("--runs", type=int, default=3, help="timed calls after the warm-up (at least 2)")
    parser.add_argument("--max-seconds", type=float, default=1.0,
                        help="timed calls stop at 2 once they have taken this long together")
    parser.add_argument("--time-budget", type=float,
                        help="skip the measurements left after this many seconds (default 420; --tiny: none)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls in fp32")
    parser.add_argument("--tiny", action="store_true", help="CPU correctness run on tiny configs (CI)")
    parser.add_argument("--cpu-latency", action="store_true", help="single-image CPU latency of the full models")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for --cpu-latency")
    parser.add_argument("--profile", action="store_true",
                        help="(f): the top CUDA kernels of ExpansionNet v2, bf16, batch 256, beam 3, from pixels")
    parser.add_argument("--compile-backbone", action="store_true",
                        help="(g): ExpansionNet v2's backbone under torch.compile(mode='reduce-overhead') vs eager")
    parser.add_argument("--fused-attention", action="store_true",
                        help="(h): timm Swin's explicit window attention vs SDPA (TIMM_FUSED_ATTN=2)")
    parser.add_argument("--compile-batch-sizes", type=int, nargs="+", default=[1, 256],
                        help="batch sizes of (g) and (h)")
    parser.add_argument("--decoder-cache", choices=["static", "dynamic"], default="static",
                        help="ExpansionNet v2's decoder cache in the captioning grid, (f) and (g)")
    args = parser.parse_args()
    if args.tiny:
        args.device, args.batch_sizes, args.cache_batch_sizes, args.peer_batch_sizes = "cpu", [2], [2], [2]
        args.fused_attention, args.compile_batch_sizes = True, [2]
    if args.time_budget is None:
        args.time_budget = float("inf") if args.tiny else 420.0
    if args.cpu_latency:
        args.device = "cpu"
        torch.set_num_threads(args.threads)
    args.device = torch.device(args.device)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    specs = {name: (TINY if args.tiny else FULL)[name] for name in args.models}
    header(args)
    has_peer = args.peer_dir.is_dir()
    if not has_peer:
        print(f"(d) authors' code: skipped, no {args.peer_dir}")

    if args.cpu_latency:
        cpu_latency(args, specs)
    else:
        peak = matmul_peak(args)
        RESULTS["meta"]["bf16_matmul_tflops"] = peak
        print(f"bf16 matmul peak (8192^3): {peak:.0f} TFLOP/s" if not args.tiny else f"bf16 matmul: {peak:.3f} TFLOP/s")
        flops = {}
        for name, spec in specs.items():
            model = build(spec, args.device)
            count = sum(p.numel() for p in model.parameters())
            inputs = f"{spec['image_size']} px pixels" if "image_size" in spec else f"regions {spec['regions']}"
            print(f"\n== {name}: {count / 1e6:.1f}M parameters, {inputs} ==\n{CAPTIONING_HEADER}", flush=True)
            captioning(name, spec, model, args)
            write_json(args)
            if "image_size" in spec:
                flops[name] = backbone_flops(spec, model, args.device)
            if name == ENV2 and has_peer:
                print(f"\n(d) the authors' ExpansionNet v2 code ({args.peer_dir}) on the same weights and images")
                authors_section(model, spec, args)
            decoding_variants(name, spec, model, args)
            if args.profile and name == ENV2 and args.device.type == "cuda":
                profile_section(name, spec, model, args)
            write_json(args)
            del model
            if args.device.type == "cuda":
                torch.cuda.empty_cache()
        if not args.no_ved and ENV2 in specs:
            print("\n(b) transformers VisionEncoderDecoderModel peer, same settings")
            ved_section(args, specs[ENV2]["image_size"])
        if args.fused_attention and ENV2 in specs:
            fused_attention_section(ENV2, specs[ENV2], build(specs[ENV2], args.device), args)
        if args.compile_backbone and ENV2 in specs and args.device.type == "cuda":
            compile_section(ENV2, specs[ENV2], build(specs[ENV2], args.device), args)
        RESULTS["meta"]["backbone_flops_per_image"] = flops
        bound_table(peak, flops, args)
        summary(args)
        if args.tiny:  # the --cpu-latency code path too
            cpu_latency(args, specs)
    lengths = all(r.get("new_tokens_ok", True) for r in RESULTS["rows"])
    check(f"every generate call decoded {NEW_TOKENS} new tokens", lengths)
    skipped = sum("skipped" in (r.get("error") or "") for r in RESULTS["rows"])
    errors = [r for r in RESULTS["rows"] if r.get("error") and "skipped" not in r["error"]]
    print(f"\n{len(RESULTS['rows'])} rows, {len(errors)} with errors, {skipped} skipped (time budget); "
          f"{time.perf_counter() - START:.0f} s")
    write_json(args)
    failed = [c for c in RESULTS["checks"] if c["strict"] and not c["passed"]]
    return 1 if failed or (args.tiny and errors) else 0


if __name__ == "__main__":
    sys.exit(main())
