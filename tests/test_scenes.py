"""Captioning data (issue 25): the scene generator's captions state exactly facts of their scene, the parser reads
every template back and rejects what is outside the grammar, scenes are deterministic in their seed, and images go
in and out as PNG with the standard library."""

import struct
import zlib
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from difflm.data import scenes as S
from difflm.data.images import PNG_MAGIC, load_image, read_png, write_png
from difflm.errors import DiffLMError


def pool(seed: int = 0):
    """A stand-in for Fashion-MNIST: 5 random 28×28 images per class."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(50, 28, 28), dtype=np.uint8)
    labels = np.repeat(np.arange(10), 5)
    return images, {c: np.flatnonzero(labels == c) for c in range(10)}


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), lo=st.integers(1, 4), span=st.integers(0, 3))
def test_every_reference_caption_parses_back_to_true_facts_naming_every_item(seed, lo, span):
    images, by_class = pool()
    hi = min(4, lo + span)
    scene = S.make_scene(images, by_class, np.random.default_rng(seed), (lo, hi), list(range(10)), references=5)
    true_items, true_rels = scene.facts()
    assert scene.captions and len(set(scene.captions)) == len(scene.captions)
    for cap in scene.captions:
        facts = S.parse(cap)
        assert facts is not None, cap
        items, rels = facts
        if len(scene.items) == 1:  # the plain-class caption: the class, no size
            assert items == Counter({(None, scene.items[0].cls): 1}) and not rels
        else:
            assert items == true_items, cap
            assert not (rels - true_rels), cap  # every stated relation holds, as often as stated
            assert rels  # and it states one
        score = S.score_caption(cap, scene)
        assert score.exact and score.precision == 1.0 and score.recall == 1.0, (cap, score)


def test_relations_are_read_both_ways_and_plurals_are_counted():
    a, b = S.SceneItem("shirt", "small", 0), S.SceneItem("shirt", "small", 1)
    c = S.SceneItem("trouser", "large", 2)
    scene = S.Scene([a, b, c], np.zeros((64, 64), np.uint8))
    items, rels = S.parse("two small shirts above a large trouser")
    assert items == Counter({("small", "shirt"): 2, ("large", "trouser"): 1})
    assert rels == Counter({(("small", "shirt"), "above", ("large", "trouser")): 2})
    assert S.parse("a large trouser is below two small shirts") == (items, rels)
    assert S.score_caption("two small shirts above a large trouser", scene).exact
    wrong = S.score_caption("a large trouser above two small shirts", scene)  # relation reversed: false
    assert wrong.parsed and wrong.correct == 3 and wrong.stated == 5 and not wrong.exact
    half = S.score_caption("a small shirt above a large trouser", scene)  # true, but one shirt unnamed
    assert half.precision == 1.0 and half.recall < 1.0 and not half.exact


@pytest.mark.parametrize("text", ["", "a bags", "two bag above a coat", "a small bag left of a large coat",
                                  "a small bag above", "the small bag above a large coat", "a huge bag above a coat",
                                  "a small bag above a large coat above a small shirt"])
def test_captions_outside_the_grammar_are_unparsed_and_count_as_wrong(text):
    assert S.parse(text) is None
    scene = S.Scene([S.SceneItem("bag", "small", 0), S.SceneItem("coat", "large", 2)], np.zeros((64, 64), np.uint8))
    sc = S.score_caption(text, scene)
    assert not sc.parsed and sc.precision == 0.0 and sc.recall == 0.0
    m = S.caption_metrics([text, "a small bag above a large coat"], [scene, scene])
    assert m["fact_f1"] == pytest.approx(50.0) and m["exact"] == 50.0 and m["parsed"] == 50.0


def test_scenes_are_a_function_of_their_seed_and_items_sit_in_their_cells(tmp_path):
    images, by_class = pool(1)
    a = S.make_scene(images, by_class, np.random.default_rng([3, 0, 7]), (2, 4), list(range(10)))
    b = S.make_scene(images, by_class, np.random.default_rng([3, 0, 7]), (2, 4), list(range(10)))
    c = S.make_scene(images, by_class, np.random.default_rng([3, 0, 8]), (2, 4), list(range(10)))
    assert a.captions == b.captions and np.array_equal(a.image, b.image)
    assert not np.array_equal(a.image, c.image)
    for cell in range(4):  # ink only in the cells that hold an item
        block = a.image[(cell // 2) * 32 : (cell // 2) * 32 + 32, (cell % 2) * 32 : (cell % 2) * 32 + 32]
        assert (block.max() > 0) == (cell in {it.cell for it in a.items})


def test_fashion_mnist_scenes_use_disjoint_images_per_split_and_bad_files_are_one_line_errors(tmp_path):
    try:
        train = S.make_scenes("train", 3, seed=5)
    except DiffLMError as e:
        pytest.skip(f"Fashion-MNIST is not installed here ({e})")
    assert train[0].image.shape == (64, 64) and train[0].image.dtype == np.uint8
    assert [s.captions for s in S.make_scenes("train", 3, seed=5)] == [s.captions for s in train]
    assert S.load_fashion_mnist("valid")[0].shape == (10000, 28, 28)
    assert S.load_fashion_mnist("test")[0].shape == (10000, 28, 28)
    with pytest.raises(DiffLMError, match="Fashion-MNIST not found"):
        S.load_fashion_mnist("train", str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"not an idx file")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(DiffLMError, match="not an IDX file"):
        S.load_fashion_mnist("train", str(tmp_path))
    with pytest.raises(DiffLMError, match="scene holds 1 to 4"):
        S.parse_items("2-5")
    with pytest.raises(DiffLMError, match="unknown scene class"):
        S.class_ids(["hat"])


def _png(img: np.ndarray, filters: list[int], channels: int = 1) -> bytes:
    """A PNG encoded here by the spec (a second route to the reader): each scanline with the given filter type."""
    h, w = img.shape[:2]
    px = img.reshape(h, -1).astype(np.int32)
    bpp, out, prev = channels, b"", np.zeros(px.shape[1], np.int32)
    for y in range(h):
        ft, cur = filters[y % len(filters)], px[y]
        left = np.concatenate([np.zeros(bpp, np.int32), cur[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), prev[:-bpp]])
        if ft == 0:
            pred = np.zeros_like(cur)
        elif ft == 1:
            pred = left
        elif ft == 2:
            pred = prev
        elif ft == 3:
            pred = (left + prev) >> 1
        else:
            p = left + prev - upleft
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
        out += bytes([ft]) + ((cur - pred) & 0xFF).astype(np.uint8).tobytes()
        prev = cur

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ctype = {1: 0, 3: 2}[channels]
    return PNG_MAGIC + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, ctype, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(out)) + chunk(b"IEND", b"")


def test_png_images_round_trip_under_every_filter_and_rgb_turns_gray(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(9, 7), dtype=np.uint8)
    p = tmp_path / "a.png"
    write_png(p, img)
    assert np.array_equal(read_png(p), img)
    for ft in range(5):
        p.write_bytes(_png(img, [ft, (ft + 2) % 5]))
        assert np.array_equal(read_png(p), img), ft
    rgb = np.stack([img, img, img], -1)
    p.write_bytes(_png(rgb, [4, 1, 3], channels=3))
    assert np.array_equal(load_image(p), img)  # equal channels: the luma is the channel
    np.save(tmp_path / "f.npy", img.astype(np.float32) / 255)
    assert np.array_equal(load_image(tmp_path / "f.npy"), img)
    (tmp_path / "x.png").write_text("hello")
    with pytest.raises(DiffLMError, match="is not a PNG image"):
        read_png(tmp_path / "x.png")
    (tmp_path / "y.png").write_bytes(_png(img, [0])[:40])
    with pytest.raises(DiffLMError, match="damaged PNG"):
        read_png(tmp_path / "y.png")
