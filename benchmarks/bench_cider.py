"""Speed of hfcap's CiderD against pycocoevalcap's CIDEr-D, on synthetic COCO-like captions.

    OMP_NUM_THREADS=1 python benchmarks/bench_cider.py [--repeats 5]

(a) SCST batch: 50 images x 5 sampled captions, each against its image's 5 references, document frequencies
    precomputed once from a 10,000-image x 5-caption training corpus. pycocoevalcap side: a ``CiderScorer`` given
    that df dict (what self-critical.pytorch / M2 do), cooking and vectorising the batch strings; hfcap side:
    ``CiderD(train).score`` of the same strings split into words (reference vectors cached at construction;
    the one-off setups are timed separately).
(b) Corpus mode, 5,000 captions x 5 references: ``Cider().compute_score`` on tokenised strings (its input format;
    it splits them) vs ``cider_d_corpus`` on token lists (its input format), also timed including the ``str.split``
    of the same strings. Both include all the work: n-gram counting, document frequencies, scores.
Median CPU time (``time.process_time``: on a shared machine wall time measures the neighbours) over the
repeats, garbage collector off while timing (as ``timeit``), single thread; the largest score difference between
the two implementations is printed too.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time

import numpy as np
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer

from hfcap.metrics.cider import CiderD, cider_d_corpus

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


def median_ms(fn, repeats: int) -> tuple[float, object]:
    """Median CPU time of ``fn()`` in ms, with the garbage collector off while timing (as ``timeit``)."""
    times, result = [], None
    for _ in range(repeats):
        gc.disable()
        start = time.process_time()
        result = fn()
        times.append(time.process_time() - start)
        gc.enable()
    return 1000 * statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(0)

    # (a) SCST batch with a precomputed training df.
    train = [image_captions(rng, 5) for _ in range(10_000)]

    def pycoco_df() -> dict:
        scorer = CiderScorer(n=4, sigma=6.0)
        for refs in train:
            scorer.cook_append(None, refs)
        scorer.compute_doc_freq()
        return scorer.document_frequency

    pycoco_setup, train_df = median_ms(pycoco_df, 1)
    hfcap_setup, scorer = median_ms(lambda: CiderD([[ref.split() for ref in refs] for refs in train]), 1)
    images = rng.sample(range(len(train)), 50)
    batch_images = [i for i in images for _ in range(5)]
    samples = [caption(rng) for _ in batch_images]

    def pycoco_batch() -> np.ndarray:
        batch = CiderScorer(n=4, sigma=6.0)
        for sample, image in zip(samples, batch_images):
            batch.cook_append(sample, train[image])
        batch.document_frequency = train_df
        # compute_cider sets ref_len = log(#cooked pairs); the work does not depend on it.
        return np.array(batch.compute_cider())

    def hfcap_batch() -> np.ndarray:
        return scorer.score([sample.split() for sample in samples], batch_images)

    pycoco_ms, _ = median_ms(pycoco_batch, args.repeats)
    hfcap_ms, _ = median_ms(hfcap_batch, args.repeats * 20)
    # Exactness with pycocoevalcap's own df and N: one candidate for each training image.
    everyone = [caption(rng) for _ in train]
    _, expected = Cider().compute_score(dict(enumerate(train)), {i: [c] for i, c in enumerate(everyone)})
    delta = np.abs(scorer.score([c.split() for c in everyone], range(len(train))) - expected).max()
    print(f"setup, df (+ hfcap's reference vectors) of 10,000 images x 5 refs: pycocoevalcap {pycoco_setup:.0f} ms, "
          f"hfcap {hfcap_setup:.0f} ms")
    print(f"(a) SCST batch 50 images x 5 samples x 5 refs: pycocoevalcap {pycoco_ms:.1f} ms, hfcap {hfcap_ms:.2f} ms, "
          f"{pycoco_ms / hfcap_ms:.1f}x  (max |delta| vs pycocoevalcap on 10,000 captions: {delta:.1e})")

    # (b) Corpus mode, 5,000 captions: each library gets the tokenised captions in its own input format.
    refs = [image_captions(rng, 5) for _ in range(5_000)]
    cands = [caption(rng) for _ in refs]
    gts, res = dict(enumerate(refs)), {i: [c] for i, c in enumerate(cands)}
    cand_tokens, ref_tokens = [c.split() for c in cands], [[r.split() for r in rs] for rs in refs]
    pycoco_ms, (_, expected) = median_ms(lambda: Cider().compute_score(gts, res), max(1, args.repeats // 2))
    hfcap_ms, (_, ours) = median_ms(lambda: cider_d_corpus(cand_tokens, ref_tokens), args.repeats)
    split_ms, _ = median_ms(
        lambda: cider_d_corpus([c.split() for c in cands], [[r.split() for r in rs] for rs in refs]), args.repeats
    )
    print(f"(b) corpus mode 5,000 captions x 5 refs: pycocoevalcap {pycoco_ms:.0f} ms (strings), "
          f"hfcap {hfcap_ms:.1f} ms (token lists), {pycoco_ms / hfcap_ms:.1f}x; "
          f"hfcap incl. str.split of the strings {split_ms:.1f} ms, {pycoco_ms / split_ms:.1f}x  "
          f"(max |delta|: {np.abs(ours - expected).max():.1e})")


if __name__ == "__main__":
    main()
