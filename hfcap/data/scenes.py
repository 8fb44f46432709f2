"""The embedded "scenes" dataset: procedural images of coloured shapes with true, varied reference captions.

Every image holds 1-4 objects (a shape, a colour, a size and a position) on a light background (flat colour,
gradient or light noise). Objects come in *groups* of identical objects (same colour, shape and size), so counts
("two red circles") are exact: no other object in the image has that colour and shape. Five distinct captions per
image are drawn from a small grammar with real variation (word order, synonyms, optional size words and positions,
counts vs lists, "there is/are", inverse relations), so BLEU/CIDEr behave roughly as on COCO while the vocabulary
stays small (69 words) and a tiny model can learn it on CPU in minutes.

Everything is a pure function of ``(seed, image index, image size)``: the same seed gives byte-identical PNGs and
JSON, whatever the number of worker processes. ``generate_scenes`` writes PNGs plus a Karpathy-format
``dataset_scenes.json``; ``load_scenes`` caches that on disk and loads it through ``load_karpathy``.
"""

import json
import math
import multiprocessing
import os
import random
import re
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

GENERATOR_VERSION = 1
COMPLETE_MARKER = ".complete"
JSON_NAME = "dataset_scenes.json"

COLORS = {
    "red": (220, 35, 35),
    "green": (40, 160, 60),
    "blue": (35, 75, 225),
    "yellow": (245, 215, 30),
    "purple": (135, 55, 185),
    "orange": (250, 135, 25),
    "pink": (250, 120, 190),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
COLOR_JITTER = 10  # per channel, so pixel colours vary while staying unmistakable
BACKGROUNDS = [(235, 235, 235), (215, 215, 215), (245, 240, 225), (225, 235, 245), (225, 240, 225), (240, 228, 240)]

# Object radius as a fraction of the image side: large objects stay ~3x the size of small ones in area, and small
# ones remain ~12 px wide after downsizing to 64 px.
RADIUS = {"large": (0.15, 0.18), "small": (0.085, 0.105)}
# (number of objects, weight) and, per number, (group sizes, weight): 1-3 objects are the common case.
NUM_OBJECTS = ((1, 0.25), (2, 0.38), (3, 0.27), (4, 0.10))
GROUPINGS = {
    1: (((1,), 1.0),),
    2: (((1, 1), 0.7), ((2,), 0.3)),
    3: (((1, 1, 1), 0.5), ((2, 1), 0.35), ((3,), 0.15)),
    4: (((1, 1, 1, 1), 0.3), ((2, 1, 1), 0.3), ((2, 2), 0.2), ((3, 1), 0.1), ((4,), 0.1)),
}
P_LARGE = {1: 0.5, 2: 0.5, 3: 0.35, 4: 0.25}

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
SIZE_WORDS = {"large": ("big", "large"), "small": ("small", "little", "tiny")}
RELATION_WORDS = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "next": ("next to", "beside"),
}


def _weighted(rng, options):
    values, weights = zip(*options)
    return rng.choices(values, weights=weights)[0]


def _layout(rng, sizes, image_size):
    """Non-overlapping (cx, cy, r) per object, in pixels; ``None`` when random placement keeps failing."""
    placed = []
    for size in sizes:
        r = rng.uniform(*RADIUS[size]) * image_size
        margin = 0.02 * image_size + r
        for _ in range(200):
            cx, cy = rng.uniform(margin, image_size - margin), rng.uniform(margin, image_size - margin)
            if all(math.hypot(cx - x, cy - y) > r + pr + 0.04 * image_size for x, y, pr in placed):
                placed.append((cx, cy, r))
                break
        else:
            return None
    return placed


def relations(a, b, image_size):
    """The spatial relations "a is <relation> b" that are true at a glance, for objects given as dicts (x, y, r).

    One axis must dominate (|d| > 1.5 x the other axis) and the offset must exceed 12% of the image side; a
    horizontal relation with a small gap between the outlines is also "next" (to). Empty when nothing is clear.
    """
    dx, dy = b["x"] - a["x"], b["y"] - a["y"]
    if abs(dx) > 1.5 * abs(dy) and abs(dx) > 0.12 * image_size:
        near = abs(dx) - a["r"] - b["r"] < 0.2 * image_size and abs(dy) < 0.5 * (a["r"] + b["r"])
        return ["left" if dx > 0 else "right"] + (["next"] if near else [])
    if abs(dy) > 1.5 * abs(dx) and abs(dy) > 0.12 * image_size:
        return ["above" if dy > 0 else "below"]
    return []


def region(obj, image_size):
    """Where a lone object sits: ("left"|"center"|"right"|None, "top"|"middle"|"bottom"|None); None = borderline."""

    def bucket(value, low, mid, high):
        t = value / image_size
        return low if t < 0.38 else high if t > 0.62 else mid if 0.44 < t < 0.56 else None

    return bucket(obj["x"], "left", "center", "right"), bucket(obj["y"], "top", "middle", "bottom")


def sample_scene(seed, index, image_size=224):
    """The objects of scene ``index``: a list of dicts (shape, color, size, x, y, r, angle, group), deterministic."""
    rng = random.Random(f"scenes-{seed}-{index}")
    while True:
        n = _weighted(rng, NUM_OBJECTS)
        grouping = _weighted(rng, GROUPINGS[n])
        kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], len(grouping))
        sizes = ["large" if rng.random() < P_LARGE[n] else "small" for _ in grouping]
        per_object = [(g, size) for g, (count, size) in enumerate(zip(grouping, sizes)) for _ in range(count)]
        positions = _layout(rng, [size for _, size in per_object], image_size)
        if positions is None:
            continue
        objects = [
            dict(group=g, color=kinds[g][0], shape=kinds[g][1], size=size, x=round(x, 2), y=round(y, 2), r=round(r, 2),
                 angle=round(rng.uniform(-12, 12), 2) if kinds[g][1] in ("triangle", "star", "hexagon") else 0.0)
            for (g, size), (x, y, r) in zip(per_object, positions)
        ]
        # Two-object scenes always show a clear relation, so relations are frequent enough to be learned.
        if n == 2 and len(grouping) == 2 and not relations(objects[0], objects[1], image_size):
            continue
        return objects


def _polygon(cx, cy, radius, n, angle_deg, inner=None):
    """Vertices of a regular polygon (or a star when ``inner`` is a radius ratio) pointing up, rotated by the angle."""
    count = 2 * n if inner else n
    points = []
    for k in range(count):
        rr = radius * (inner if inner and k % 2 else 1.0)
        theta = math.radians(angle_deg - 90 + 360 * k / count)
        points.append((cx + rr * math.cos(theta), cy + rr * math.sin(theta)))
    return points


def _background(rng, image_size):
    """A light flat colour, a two-colour gradient, or a flat colour with light block noise, as an RGB image."""
    base = np.array(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], dtype=np.float32)
    kind = rng.integers(3)
    if kind == 0:
        return Image.new("RGB", (image_size, image_size), tuple(int(c) for c in base))
    if kind == 1:
        other = np.array(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], dtype=np.float32) - 15
        t = np.linspace(0.0, 1.0, image_size, dtype=np.float32)[:, None]
        ramp = (base * (1 - t) + other * t).astype(np.uint8)[:, None, :]  # (H, 1, 3)
        canvas = np.broadcast_to(ramp, (image_size, image_size, 3))
        return Image.fromarray(np.ascontiguousarray(canvas.transpose(1, 0, 2) if rng.integers(2) else canvas))
    # Noise in 4x4 blocks: visible texture at full size that still compresses well as PNG.
    blocks = np.clip(base + rng.normal(0.0, 5.0, size=(-(-image_size // 4),) * 2 + (1,)), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(blocks.repeat(4, 0).repeat(4, 1)[:image_size, :image_size]))


def render_scene(objects, seed, index, image_size=224):
    """Draw the objects of a scene on its background; returns an RGB ``PIL.Image``."""
    rng = np.random.default_rng([GENERATOR_VERSION, seed, index])
    image = _background(rng, image_size)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
        color = tuple(int(min(max(c + j, 0), 255)) for c, j in zip(COLORS[obj["color"]], jitter))
        cx, cy, r, shape = obj["x"], obj["y"], obj["r"], obj["shape"]
        if shape == "circle":
            draw.ellipse([cx - 0.9 * r, cy - 0.9 * r, cx + 0.9 * r, cy + 0.9 * r], fill=color)
        elif shape == "square":
            draw.rectangle([cx - 0.72 * r, cy - 0.72 * r, cx + 0.72 * r, cy + 0.72 * r], fill=color)
        elif shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)], fill=color)
        else:
            sides, inner = {"triangle": (3, None), "star": (5, 0.45), "hexagon": (6, None)}[shape]
            draw.polygon(_polygon(cx, cy, r, sides, obj["angle"], inner), fill=color)
    return image


def _noun_phrase(rng, obj, count, allow_one=True):
    """E.g. "a big red circle", "two little blue stars", "a pair of red squares"; size words are optional."""
    words = []
    if count == 1:
        words.append("one" if allow_one and rng.random() < 0.15 else "a")
    elif count == 2 and rng.random() < 0.2:
        words += ["a", "pair", "of"]
    else:
        words.append(NUMBER_WORDS[count])
    if rng.random() < 0.45:
        words.append(rng.choice(SIZE_WORDS[obj["size"]]))
    words += [obj["color"], obj["shape"] + ("s" if count > 1 else "")]
    return " ".join(words)


def _position_phrase(rng, obj, image_size):
    """E.g. "on the left", "in the top right corner", "in the middle"; ``None`` when the position is borderline."""
    h, v = region(obj, image_size)
    if h in ("left", "right") and v in ("top", "bottom"):
        return rng.choice([f"in the {v} {h} corner", f"at the {v} {h}"])
    if h in ("left", "right"):
        return f"on the {h}"
    if v in ("top", "bottom"):
        return f"at the {v}"
    if (h, v) == ("center", "middle"):
        return rng.choice(["in the middle", "in the center"])
    return None


def _join(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _fix_articles(text):
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _describe(rng, objects, image_size):
    """One caption: a whole-scene description, or (when a clear pair exists) a relation between two objects."""
    groups = [[o for o in objects if o["group"] == g] for g in sorted({o["group"] for o in objects})]
    singles = [g[0] for g in groups if len(g) == 1]
    pairs = [(a, b, rel) for a in singles for b in singles if a is not b for rel in relations(a, b, image_size)]
    total = len(objects)

    if pairs and rng.random() < 0.45:
        a, b, rel = rng.choice(pairs)
        phrase = rng.choice(RELATION_WORDS[rel])
        clause = f"{_noun_phrase(rng, a, 1, False)} {phrase} {_noun_phrase(rng, b, 1, False)}"
        form = rng.randrange(4) if total > 2 else rng.randrange(3)
        if form == 0:
            clause = clause.replace(f" {phrase} ", f" is {phrase} ", 1)
        elif form == 1:
            clause = f"there is {clause}"
        elif form == 3:
            clause = f"{NUMBER_WORDS[total]} {rng.choice(['shapes', 'objects'])} with {clause}"
        return _fix_articles(clause)

    items = []
    for group in rng.sample(groups, len(groups)):
        item = _noun_phrase(rng, group[0], len(group))
        position = _position_phrase(rng, group[0], image_size) if len(group) == 1 and rng.random() < 0.3 else None
        items.append(f"{item} {position}" if position else item)
    listing = _join(items)
    first_plural = not items[0].startswith(("a ", "one "))
    forms = [
        listing,
        f"there {'are' if first_plural else 'is'} {listing}",
        f"{rng.choice(['a picture', 'an image', 'a drawing'])} of {listing}",
        f"{rng.choice(['this image', 'the picture'])} shows {listing}",
    ]
    if " the " not in listing:  # "a red circle on the left on a light background" reads badly
        forms.append(f"{listing} on a light background")
    if total > 1:
        forms.append(f"{NUMBER_WORDS[total]} {rng.choice(['shapes', 'objects'])}: {listing}")
    else:
        forms.append(f"{rng.choice(['a single', 'just one', 'only one'])} {listing.split(' ', 1)[1]}")
    return _fix_articles(rng.choice(forms))


def scene_captions(objects, seed, index, image_size=224, num_captions=5):
    """``num_captions`` distinct true captions of a scene, deterministic in (seed, index)."""
    rng = random.Random(f"captions-{seed}-{index}")
    captions = []
    for _ in range(200):
        caption = _describe(rng, objects, image_size)
        if caption not in captions:
            captions.append(caption)
            if len(captions) == num_captions:
                return captions
    raise RuntimeError(f"could not draw {num_captions} distinct captions for scene {index}")


def tokenize(caption):
    """Karpathy-style tokens: lowercase words, punctuation dropped."""
    return re.findall(r"[a-z]+", caption.lower())


def _generate_chunk(job):
    """Worker: render, save and describe the scenes of one chunk; returns their Karpathy image records."""
    output_dir, seed, image_size, items = job
    records = []
    for index, split in items:
        objects = sample_scene(seed, index, image_size)
        filename = f"{index:06d}.png"
        render_scene(objects, seed, index, image_size).save(Path(output_dir) / split / filename, compress_level=1)
        captions = scene_captions(objects, seed, index, image_size)
        records.append({
            "filepath": split, "filename": filename, "split": split, "imgid": index,
            "sentids": [5 * index + k for k in range(len(captions))],
            "sentences": [{"raw": c, "tokens": tokenize(c), "imgid": index, "sentid": 5 * index + k}
                          for k, c in enumerate(captions)],
            "objects": [{k: o[k] for k in ("shape", "color", "size", "x", "y", "r")} for o in objects],
        })
    return records


def generate_scenes(output_dir, *, num_train=10000, num_val=500, num_test=500, seed=0, image_size=224,
                    num_workers=2, chunk_size=100):
    """Write the scenes dataset to ``output_dir``: ``<split>/<index>.png`` plus the Karpathy JSON (returned).

    The completed-marker file is removed first and written last, so an interrupted run is never mistaken for a
    finished one. Images are numbered globally (train, then val, then test) and each depends only on its index.
    """
    start = time.perf_counter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / COMPLETE_MARKER).unlink(missing_ok=True)
    splits = ["train"] * num_train + ["val"] * num_val + ["test"] * num_test
    for split in ("train", "val", "test"):
        (output_dir / split).mkdir(exist_ok=True)
    items = list(enumerate(splits))
    jobs = [(str(output_dir), seed, image_size, items[i:i + chunk_size]) for i in range(0, len(items), chunk_size)]

    records = []
    with tqdm(total=len(items), desc="Generating scenes", unit="img") as bar:
        if num_workers > 1 and len(jobs) > 1:
            # fork: workers only use PIL/numpy, and unlike spawn it works from unguarded scripts and notebooks.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with multiprocessing.get_context(method).Pool(num_workers) as pool:
                for chunk in pool.imap(_generate_chunk, jobs):
                    records += chunk
                    bar.update(len(chunk))
        else:
            for job in jobs:
                chunk = _generate_chunk(job)
                records += chunk
                bar.update(len(chunk))

    json_path = output_dir / JSON_NAME
    meta = {"generator_version": GENERATOR_VERSION, "seed": seed, "image_size": image_size,
            "num_train": num_train, "num_val": num_val, "num_test": num_test}
    json_path.write_text(json.dumps({"dataset": "scenes", **meta, "images": records}))
    (output_dir / COMPLETE_MARKER).write_text(json.dumps({**meta, "seconds": round(time.perf_counter() - start, 2)}))
    return json_path


def default_cache_dir():
    """``$HFCAP_CACHE`` or ``~/.cache/hfcap``."""
    return Path(os.environ.get("HFCAP_CACHE", Path.home() / ".cache" / "hfcap"))


def load_scenes(cache_dir=None, *, num_train=10000, num_val=500, num_test=500, seed=0, image_size=224,
                num_workers=2):
    """The scenes dataset as a ``DatasetDict`` (train/val/test), generated into the cache on first use.

    The cache subfolder is named by the parameters (and generator version), so different sizes and seeds never
    clash; a folder without the completed-marker (an interrupted run) is regenerated.
    """
    name = f"scenes-v{GENERATOR_VERSION}-seed{seed}-{num_train}-{num_val}-{num_test}-{image_size}px"
    folder = Path(cache_dir or default_cache_dir()) / name
    if not (folder / COMPLETE_MARKER).is_file():
        generate_scenes(folder, num_train=num_train, num_val=num_val, num_test=num_test, seed=seed,
                        image_size=image_size, num_workers=num_workers)
    from .loaders import load_karpathy

    return load_karpathy(folder / JSON_NAME, folder)
