"""Speed of hfcap's CIDEr-D against pycocoevalcap's, on synthetic COCO-like captions.

    OMP_NUM_THREADS=1 python benchmarks/bench_cider.py [--repeats 5]

Both sides get the same caption strings and include their own splitting of them; the cases are

(a) SCST batch, 50 images x 5 sampled captions, each against its image's 5 references, and
(b) SCST at 5,000 captions, 1,000 images x 5 samples: document frequencies precomputed once from a 10,000-image x
    5-caption training corpus. pycocoevalcap side: a ``CiderScorer`` given that df dict (what self-critical.pytorch
    and M2 do), cooking the candidates and references of the batch and scoring them; hfcap side:
    ``CiderD(train).score`` (reference vectors cached at construction). The one-off setups (df, plus hfcap's
    reference vectors) are excluded from both and timed separately.
(c) Corpus mode, 5,000 captions x 5 references: ``Cider().compute_score`` against ``cider_d_corpus``, everything
    included (n-gram counting, document frequencies of the evaluated references, scores).

Times are CPU times (``time.process_time``: on a shared machine wall time measures the neighbours), medians over the
repeats, the two sides' runs interleaved so that both see the same load, garbage collector off while timing (as
``timeit``), single thread. The largest per-caption difference from
pycocoevalcap is printed for the SCST scorer (one candidate per training image, so N and df are pycocoevalcap's) and
for corpus mode.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import time
from functools import partial

import numpy as np
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer

from hfcap.metrics.cider import CiderD, cider_d_corpus

TARGET = 20.0  # required speed-up over pycocoevalcap
HFCAP_RUNS = 4  # hfcap runs per pycocoevalcap run

SUBJECTS = (
    "man woman boy girl child person dog cat horse bird giraffe elephant zebra bear cow sheep train bus truck car "
    "motorcycle bicycle plane boat pizza sandwich cake player skier surfer skateboarder couple group"
).split()
ADJECTIVES = "young old small large little big white black brown red blue green yellow wooden tall short happy".split()
VERBS = (
    "sitting standing walking riding eating holding looking playing laying flying parked running jumping waiting "
    "driving carrying"
).split()
PREPOSITIONS = "on in near next to under behind with at by across over along".split()
PLACES = (
    "table street field beach road grass water snow building kitchen counter plate park fence tree sidewalk track "
    "ocean room bed wall window sky city hill court"
).split()


def caption(rng: random.Random, subject: str | None = None, place: str | None = None) -> str:
    """One synthetic COCO-like caption (9-16 words) about ``subject`` at ``place`` (random when None)."""
    subject, place = subject or rng.choice(SUBJECTS), place or rng.choice(PLACES)
    words = ["a", rng.choice(ADJECTIVES), subject, "is", rng.choice(VERBS), rng.choice(PREPOSITIONS), "the"]
    words += [rng.choice(ADJECTIVES), place] if rng.random() < 0.5 else [place]
    if rng.random() < 0.6:
        words += ["with", "a", rng.choice(ADJECTIVES), rng.choice(SUBJECTS), rng.choice(PREPOSITIONS), "a"]
        words.append(rng.choice(PLACES))
    return " ".join(words)


def image_captions(rng: random.Random, count: int) -> list[str]:
    """Captions of one image: annotators mostly agree on its subject and place."""
    subject, place = rng.choice(SUBJECTS), rng.choice(PLACES)
    return [caption(rng, *((subject, place) if rng.random() < 0.7 else ())) for _ in range(count)]


def cpu_ms(fn) -> tuple[float, object]:
    """CPU time of one ``fn()`` in ms, with the garbage collector off while timing (as ``timeit``)."""
    gc.disable()
    start = time.process_time()
    result = fn()
    elapsed = time.process_time() - start
    gc.enable()
    return 1000 * elapsed, result


def compare(pycoco_fn, hfcap_fn, repeats: int) -> tuple[float, float, object, object]:
    """Median CPU times (ms) and results of both sides.

    The runs are interleaved (each round: pycocoevalcap once, hfcap ``HFCAP_RUNS`` times) so that both sides see the
    same load of a shared machine.
    """
    pycoco_times, hfcap_times = [], []
    for _ in range(repeats):
        pycoco_ms, pycoco_result = cpu_ms(pycoco_fn)
        pycoco_times.append(pycoco_ms)
        for _ in range(HFCAP_RUNS):
            hfcap_ms, hfcap_result = cpu_ms(hfcap_fn)
            hfcap_times.append(hfcap_ms)
    return statistics.median(pycoco_times), statistics.median(hfcap_times), pycoco_result, hfcap_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5,
                        help=f"timed runs of pycocoevalcap (hfcap: {HFCAP_RUNS}x as many)")
    args = parser.parse_args()
    rng = random.Random(0)
    results = []  # (case, pycocoevalcap ms, hfcap ms)

    # SCST: a training corpus whose df is precomputed once, as the reward scorer does.
    train = [image_captions(rng, 5) for _ in range(10_000)]

    def pycoco_df() -> dict:
        scorer = CiderScorer(n=4, sigma=6.0)
        for refs in train:
            scorer.cook_append(None, refs)
        scorer.compute_doc_freq()
        return scorer.document_frequency

    pycoco_setup, train_df = cpu_ms(pycoco_df)
    hfcap_setup, scorer = cpu_ms(lambda: CiderD([[ref.split() for ref in refs] for refs in train]))
    print(f"setup (excluded from the SCST cases): df of 10,000 images x 5 refs: pycocoevalcap {pycoco_setup:.0f} ms; "
          f"hfcap (df + cached reference vectors) {hfcap_setup:.0f} ms")

    def pycoco_scst(samples: list[str], images: list[int]) -> np.ndarray:
        batch = CiderScorer(n=4, sigma=6.0)
        for sample, image in zip(samples, images):
            batch.cook_append(sample, train[image])
        batch.document_frequency = train_df
        # compute_cider sets ref_len = log(#cooked pairs) instead of log(10,000); the work does not depend on it.
        return np.array(batch.compute_cider())

    def hfcap_scst(samples: list[str], images: list[int]) -> np.ndarray:
        return scorer.score([sample.split() for sample in samples], images)

    for case, num_images in (("(a) SCST batch 50 images x 5 samples x 5 refs", 50),
                             ("(b) SCST 5,000 captions (1,000 images x 5 samples x 5 refs)", 1_000)):
        images = [i for i in rng.sample(range(len(train)), num_images) for _ in range(5)]
        samples = [caption(rng) for _ in images]
        pycoco_ms, hfcap_ms, _, _ = compare(partial(pycoco_scst, samples, images), partial(hfcap_scst, samples, images),
                                            args.repeats)
        results.append((case, pycoco_ms, hfcap_ms))
        print(f"{case}: pycocoevalcap {pycoco_ms:.1f} ms, hfcap {hfcap_ms:.2f} ms")
    # Exactness of the SCST scorer with pycocoevalcap's own df and N: one candidate for each training image.
    everyone = [caption(rng) for _ in train]
    _, expected = Cider().compute_score(dict(enumerate(train)), {i: [c] for i, c in enumerate(everyone)})
    delta = np.abs(hfcap_scst(everyone, list(range(len(train)))) - expected).max()
    print(f"    SCST scorer: max |delta| vs pycocoevalcap on 10,000 captions {delta:.1e}")

    # (c) Corpus mode: df from the evaluated references, all included.
    case = "(c) corpus mode 5,000 captions x 5 refs"
    refs = [image_captions(rng, 5) for _ in range(5_000)]
    cands = [caption(rng) for _ in refs]
    gts, res = dict(enumerate(refs)), {i: [c] for i, c in enumerate(cands)}
    pycoco_ms, hfcap_ms, (_, expected), (_, ours) = compare(lambda: Cider().compute_score(gts, res),
                                                            lambda: cider_d_corpus(cands, refs), args.repeats)
    results.append((case, pycoco_ms, hfcap_ms))
    print(f"{case}: pycocoevalcap {pycoco_ms:.0f} ms, hfcap {hfcap_ms:.1f} ms")
    print(f"    corpus mode: max |delta| vs pycocoevalcap on 5,000 captions {np.abs(ours - expected).max():.1e}")

    print(f"\nSummary: CPU time (time.process_time), median of {args.repeats} pycocoevalcap / "
          f"{HFCAP_RUNS * args.repeats} hfcap runs, interleaved, gc disabled while timing, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; both sides from the same strings")
    for case, pycoco_ms, hfcap_ms in results:
        ratio = pycoco_ms / hfcap_ms
        print(f"{case}: pycocoevalcap {pycoco_ms:.1f} ms, hfcap {hfcap_ms:.2f} ms, {ratio:.1f}x "
              f"(target >= {TARGET:.0f}x: {'PASS' if ratio >= TARGET else 'FAIL'})")


if __name__ == "__main__":
    main()
