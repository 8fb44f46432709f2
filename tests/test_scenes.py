"""The embedded scenes dataset: determinism, captions that are true of the pixels, caption variety, caching."""

import itertools
import re
from collections import deque

import numpy as np
import pytest

from hfcap.data import generate_scenes, load_scenes
from hfcap.data.scenes import COLORS, COMPLETE_MARKER, SHAPES, render_scene, sample_scene, scene_captions, tokenize

SIZE = 224
NUM_CHECKED = 40

COLOR = "|".join(COLORS)
SHAPE = "|".join(SHAPES)
ITEM = re.compile(
    rf"\b(a pair of|a single|just one|only one|a|an|one|two|three|four) (?:(big|large|small|little|tiny) )?({COLOR}) ({SHAPE})s?"
    r"(?: (on the left|on the right|at the top|at the bottom|in the middle|in the center"
    r"|(?:in the|at the) (?:top|bottom) (?:left|right)(?: corner)?))?(?! of)"
)
RELATION = re.compile(
    r"(to the left of|on the left of|left of|to the right of|on the right of|right of|above|over|below|under|beneath"
    r"|next to|beside)"
)
NUMBER = {"a": 1, "an": 1, "one": 1, "a single": 1, "just one": 1, "only one": 1, "a pair of": 2, "two": 2, "three": 3, "four": 4}


def color_components(image):
    """{color name: [pixel coordinate arrays (ys, xs) of each 4-connected blob of that palette colour]}."""
    pixels = np.asarray(image).astype(int)
    found = {}
    for name, rgb in COLORS.items():
        mask = (np.abs(pixels - np.array(rgb)) <= 12).all(axis=-1)
        seen = np.zeros_like(mask)
        blobs = []
        for start in zip(*np.nonzero(mask)):
            if seen[start]:
                continue
            seen[start] = True
            queue, blob = deque([start]), []
            while queue:
                y, x = queue.popleft()
                blob.append((y, x))
                for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if 0 <= ny < SIZE and 0 <= nx < SIZE and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
            if len(blob) > 20:
                blobs.append(np.array(blob).T)
        if blobs:
            found[name] = blobs
    return found


@pytest.fixture(scope="module")
def checked_scenes():
    scenes = []
    for index in range(NUM_CHECKED):
        objects = sample_scene(7, index, SIZE)
        scenes.append((render_scene(objects, 7, index, SIZE), scene_captions(objects, 7, index, SIZE)))
    return scenes


def test_captions_name_only_colours_present_and_counts_match_pixels(checked_scenes):
    whole_scene_captions = 0
    for image, captions in checked_scenes:
        blobs = color_components(image)
        for caption in captions:
            items = ITEM.findall(caption)
            assert items, caption
            mentioned = {color for _, _, color, _, _ in items}
            assert mentioned <= set(blobs), (caption, sorted(blobs))
            if RELATION.search(caption):
                continue
            # A whole-scene description lists every object: per colour, the counts add up to the blobs seen.
            whole_scene_captions += 1
            per_color = {}
            for number, _, color, _, _ in items:
                per_color[color] = per_color.get(color, 0) + NUMBER[number]
            assert per_color == {c: len(b) for c, b in blobs.items()}, caption
            total = re.match(r"(two|three|four) (shapes|objects)", caption)
            if total:
                assert NUMBER[total.group(1)] == sum(len(b) for b in blobs.values()), caption
    assert whole_scene_captions > NUM_CHECKED


def test_shapes_sizes_positions_and_relations_match_pixels(checked_scenes):
    checks = {"shape": 0, "size": 0, "position": 0, "relation": 0}
    for image, captions in checked_scenes:
        blobs = color_components(image)
        # Only objects whose colour is unique in the image can be located from the pixels alone.
        single = {color: b[0] for color, b in blobs.items() if len(b) == 1}
        for caption in captions:
            for number, size, color, shape, position in ITEM.findall(caption):
                if color not in single or NUMBER[number] != 1:
                    continue
                ys, xs = single[color]
                cy, cx = ys.mean(), xs.mean()
                fill = len(ys) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))  # area over bounding-box area
                bounds = {"square": (0.93, 1.0), "circle": (0.72, 0.84), "diamond": (0.42, 0.58), "star": (0.25, 0.5)}
                if shape in bounds:
                    assert bounds[shape][0] <= fill <= bounds[shape][1], (caption, color, fill)
                    checks["shape"] += 1
                if size:
                    extent = np.hypot(ys - cy, xs - cx).max() / SIZE
                    assert (extent > 0.12) == (size in ("big", "large")), (caption, extent)
                    checks["size"] += 1
                if position:
                    for word, ok in (("left", cx < SIZE / 2), ("right", cx > SIZE / 2), ("top", cy < SIZE / 2),
                                     ("bottom", cy > SIZE / 2)):
                        assert ok or word not in position, (caption, cx, cy)
                    checks["position"] += 1
            relation = RELATION.search(caption)
            items = ITEM.findall(caption)
            if relation and len(items) == 2 and {items[0][2], items[1][2]} <= set(single):
                (ay, ax), (by, bx) = [single[item[2]].mean(axis=1) for item in items]
                phrase = relation.group(1)
                holds = {"left": ax < bx, "right": ax > bx, "above": ay < by, "over": ay < by, "below": ay > by,
                         "under": ay > by, "beneath": ay > by, "next": abs(ax - bx) > abs(ay - by),
                         "beside": abs(ax - bx) > abs(ay - by)}
                assert holds[next(w for w in holds if w in phrase.split())], (caption, (ax, ay), (bx, by))
                checks["relation"] += 1
    assert min(checks.values()) >= 5, checks


def test_captions_are_varied_and_vocabulary_small(checked_scenes):
    jaccards, vocabulary = [], set()
    for _, captions in checked_scenes:
        assert len(captions) == 5 and len(set(captions)) == 5, captions
        tokens = [set(tokenize(c)) for c in captions]
        vocabulary.update(*tokens)
        jaccards += [len(a & b) / len(a | b) for a, b in itertools.combinations(tokens, 2)]
    assert np.mean(jaccards) < 0.8
    assert 40 <= len(vocabulary) <= 120


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != COMPLETE_MARKER}  # the marker records the generation time


def test_generation_is_deterministic(tmp_path):
    sizes = dict(num_train=12, num_val=4, num_test=4, image_size=96, chunk_size=5)
    generate_scenes(tmp_path / "a", seed=3, num_workers=1, **sizes)
    generate_scenes(tmp_path / "b", seed=3, num_workers=2, **sizes)
    generate_scenes(tmp_path / "c", seed=4, num_workers=1, **sizes)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(a) == 21 and a == b
    assert a.keys() == c.keys()
    assert sum(a[k] != c[k] for k in a) >= 19


def test_load_scenes_caches_and_regenerates_incomplete(tmp_path):
    params = dict(num_train=6, num_val=2, num_test=2, seed=1, image_size=64)
    splits = load_scenes(tmp_path, **params)
    assert {name: len(ds) for name, ds in splits.items()} == {"train": 6, "val": 2, "test": 2}
    row = splits["val"][0]
    assert row["image"].size == (64, 64) and len(row["captions"]) == 5 and row["image_id"] == 6
    (folder,) = tmp_path.iterdir()
    image = folder / "train" / "000000.png"
    stamp = image.stat().st_mtime_ns
    load_scenes(tmp_path, **params)
    assert image.stat().st_mtime_ns == stamp  # complete: reused
    (folder / COMPLETE_MARKER).unlink()
    image.write_bytes(b"half-written")
    assert load_scenes(tmp_path, **params)["train"][0]["image"].size == (64, 64)
    assert load_scenes(tmp_path, **dict(params, seed=2))["train"][0]["captions"] != splits["train"][0]["captions"]
    assert len(list(tmp_path.iterdir())) == 2
