"""The emoji world from the committed fixtures (trimmed emoji-test.txt and CLDR en.xml, pre-rendered sprites): source
parsing, scenes and their masks, captions/statements/questions, and the world written in the three dataset formats
and read back through the public readers."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comp_vlm.data.emoji_sources import (
    CLDR_PATH,
    FONT_PATH,
    FontGlyphs,
    SpriteFolder,
    load_concepts,
    parse_cldr_annotations,
    parse_emoji_test,
    select_concepts,
)
from comp_vlm.data.emoji_world import (
    COUNT_WORDS,
    SpriteBank,
    WorldConfig,
    _chunks,
    caption,
    main,
    mask_path,
    neighbours,
    patch_foreground,
    questions,
    read_mask,
    read_world,
    render_scene,
    render_sprites,
    sample_scene,
    statement,
    write_world,
)
from comp_vlm.data.karpathy import caption_vocabulary, read_karpathy, write_karpathy
from comp_vlm.data.nlvr2 import read_nlvr2, read_nlvr2_split, write_nlvr2
from comp_vlm.data.vqav2 import find_vqav2_files, read_vqav2_split, write_vqav2
from comp_vlm.errors import ConfigError, DataError

EMOJI = Path(__file__).parent / "fixtures" / "emoji"
TEST_TXT, EN_XML, SPRITES = EMOJI / "emoji-test.txt", EMOJI / "en.xml", EMOJI / "sprites"
SMALL = WorldConfig(canvas=24, min_size=8, max_size=10, min_emoji=1, max_emoji=2, keyword_rate=0.0, seed=3,
                    retrieval={"train": 12, "val": 4, "test": 6}, nlvr2={"train": 8, "dev": 4},
                    vqav2={"train": 4, "val": 3})


@pytest.fixture(scope="module")
def concepts():
    return load_concepts(TEST_TXT, EN_XML)


@pytest.fixture(scope="module")
def bank(concepts):
    return SpriteBank(render_sprites(concepts, SpriteFolder(SPRITES)))


@pytest.fixture(scope="module")
def world(tmp_path_factory, concepts):
    out = tmp_path_factory.mktemp("world")
    record = write_world(out, SMALL, concepts, SpriteFolder(SPRITES), {"emoji_test": TEST_TXT, "cldr": EN_XML},
                         progress=False)
    return out, record


# -- sources ---------------------------------------------------------------------------------------------------
def test_parse_emoji_test_keeps_groups_and_subgroups():
    entries = parse_emoji_test(TEST_TXT.read_text(encoding="utf-8"))
    assert len(entries) == 17
    moose = next(e for e in entries if e.code_points == (0x1FACE,))
    assert (moose.name, moose.status, moose.group, moose.subgroup) == ("moose", "fully-qualified",
                                                                       "Animals & Nature", "animal-mammal")
    assert {e.status for e in entries} == {"fully-qualified", "unqualified", "component"}


def test_parse_emoji_test_bad_line():
    text = "# group: G\n# subgroup: s\n1F600 ; fully-qualified # 😀 E1.0 grinning face\nnot an entry\n"
    with pytest.raises(DataError, match="emoji-test.txt: line 4: not 'code points"):
        parse_emoji_test(text)
    with pytest.raises(DataError, match="line 1: entry before any"):
        parse_emoji_test("1F600 ; fully-qualified # 😀 E1.0 grinning face\n")


def test_parse_cldr_annotations():
    notes = parse_cldr_annotations(EN_XML.read_text(encoding="utf-8"))
    assert notes["❤"] == ("red heart", ("heart", "red heart"))  # CLDR stores emoji without U+FE0F
    assert notes["🐶"] == ("dog face", ("dog", "face", "pet"))
    assert "🫎" not in notes  # moose came with Emoji 15.0, after CLDR 41
    with pytest.raises(DataError, match="en.xml: malformed XML"):
        parse_cldr_annotations("<ldml><annotations>")


def test_select_concepts_keeps_base_emoji_only(concepts):
    assert [c.name for c in concepts] == ["grinning face", "winking face", "broken heart", "red heart", "dog face",
                                          "fox", "moose", "banana", "red apple", "automobile", "bicycle"]
    heart = concepts[3]
    assert heart.code_points == (0x2764, 0xFE0F) and heart.key == "2764_fe0f" and heart.char == "❤️"
    assert heart.keywords == ("heart",)  # the keyword equal to the name is dropped
    assert concepts[6].keywords == () and concepts[6].subgroup == "animal-mammal"


def test_select_concepts_filters_are_options():
    entries = parse_emoji_test(TEST_TXT.read_text(encoding="utf-8"))
    notes = parse_cldr_annotations(EN_XML.read_text(encoding="utf-8"))
    everything = {c.name for c in select_concepts(entries, notes, max_code_points=None, include_flags=True)}
    base = {c.name for c in select_concepts(entries, notes)}
    # never: unqualified duplicates, skin-tone variants, components
    assert everything - base == {"service dog", "keycap: #", "flag: Japan"}


@pytest.mark.parametrize("kwargs, package", [
    ({"emoji_test": "/nonexistent/emoji-test.txt", "cldr": EN_XML}, "unicode-data"),
    ({"emoji_test": TEST_TXT, "cldr": "/nonexistent/en.xml"}, "unicode-cldr-core"),
])
def test_missing_source_names_its_package(kwargs, package):
    with pytest.raises(DataError, match=f"install the Debian package {package}"):
        load_concepts(**kwargs)


def test_missing_font_names_its_package():
    with pytest.raises(DataError, match="install the Debian package fonts-noto-color-emoji"):
        FontGlyphs("/nonexistent/NotoColorEmoji.ttf")


@pytest.mark.skipif(not (FONT_PATH.is_file() and CLDR_PATH.is_file()), reason="needs the Debian packages")
def test_fixture_sprites_match_the_installed_font(concepts):
    # only where the packages are installed: the committed sprites are what the font renders (reduced to 48 px)
    glyphs = FontGlyphs()
    for concept in concepts:
        rendered = glyphs.sprite(concept)
        rendered.thumbnail((48, 48), Image.Resampling.LANCZOS)
        stored = SpriteFolder(SPRITES).sprite(concept)
        assert rendered.size == stored.size
        assert np.abs(np.asarray(rendered, dtype=int) - np.asarray(stored, dtype=int)).max() <= 1


def test_sprite_folder(concepts):
    sprite = SpriteFolder(SPRITES).sprite(concepts[0])
    alpha = np.asarray(sprite.getchannel("A"))
    assert sprite.mode == "RGBA" and max(sprite.size) == 48
    assert alpha[0].any() and alpha[-1].any() and alpha[:, 0].any() and alpha[:, -1].any()  # cropped to alpha
    with pytest.raises(DataError, match="missing sprite of 'flag: Japan'"):
        SpriteFolder(SPRITES).sprite(replace(concepts[0], code_points=(0x1F1EF, 0x1F1F5), name="flag: Japan"))


# -- scenes ----------------------------------------------------------------------------------------------------
def test_patch_foreground():
    alpha = np.zeros((8, 8), dtype=np.uint8)
    alpha[0:4, 0:4] = 255  # patch (0, 0) fully covered
    alpha[4, 6] = 255  # one pixel of patch (1, 1)
    share = patch_foreground(alpha, 4)
    assert share.tolist() == [[1.0, 0.0], [0.0, 1 / 16]]
    with pytest.raises(ConfigError, match="does not split into 3-pixel patches"):
        patch_foreground(alpha, 3)


def test_sample_scene_places_distinct_emoji_left_to_right(bank, concepts):
    config = WorldConfig(canvas=24, min_size=8, max_size=10, max_emoji=3)
    for seed in range(30):
        scene = sample_scene(np.random.default_rng(seed), bank, len(concepts), config)
        boxes = [o.box for o in scene.objects]
        assert 1 <= len(boxes) <= 3 and len({o.concept for o in scene.objects}) == len(boxes)
        assert [o.centre_x for o in scene.objects] == sorted(o.centre_x for o in scene.objects)
        for i, a in enumerate(boxes):
            assert 0 <= a[0] < a[2] <= 24 and 0 <= a[1] < a[3] <= 24
            assert max(a[2] - a[0], a[3] - a[1]) == scene.objects[i].size
            for b in boxes[i + 1:]:
                assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])
                assert abs((a[0] + a[2]) - (b[0] + b[2])) >= 2 * config.min_gap
    again = sample_scene(np.random.default_rng(7), bank, len(concepts), config)
    assert again == sample_scene(np.random.default_rng(7), bank, len(concepts), config)


def test_sample_scene_that_cannot_fit(bank, concepts):
    config = WorldConfig(canvas=12, min_size=12, max_size=12, min_emoji=3, max_emoji=3, patch=4)
    with pytest.raises(ConfigError, match="cannot place 3 emoji"):
        sample_scene(np.random.default_rng(0), bank, len(concepts), config, tries=5)


def test_render_scene_mask_marks_exactly_the_emoji(bank, concepts):
    config = WorldConfig(canvas=24, min_size=8, max_size=10, noise=0.0)
    scene = sample_scene(np.random.default_rng(1), bank, len(concepts), config, count=2)
    image, alpha = render_scene(scene, bank, config)
    pixels = np.asarray(image)
    inside = np.zeros_like(alpha, dtype=bool)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        inside[y0:y1, x0:x1] = True
        sprite = np.asarray(bank.sprite(obj.concept, obj.size))
        assert (alpha[y0:y1, x0:x1] == sprite[..., 3]).all()
        opaque = sprite[..., 3] == 255
        assert (pixels[y0:y1, x0:x1][opaque] == sprite[..., :3][opaque]).all()
    assert not alpha[~inside].any()
    assert (pixels[alpha == 0] == scene.background).all()  # no noise: the background colour itself


# -- words -----------------------------------------------------------------------------------------------------
def test_caption_names_left_to_right_or_keywords(bank, concepts):
    scene = sample_scene(np.random.default_rng(4), bank, len(concepts), SMALL, count=2)
    names = [concepts[o.concept].name for o in scene.objects]
    assert caption(scene, concepts, np.random.default_rng(0), 0.0) == " and ".join(names)
    words = caption(scene, concepts, np.random.default_rng(0), 1.0).split(" and ")
    for word, obj in zip(words, scene.objects):
        c = concepts[obj.concept]
        assert word in (c.keywords or (c.name,))


def describe(scene, concepts):
    return " and ".join(concepts[o.concept].name for o in scene.objects)


def test_statements_are_true_or_change_one_name_within_its_subgroup_or_one_count(bank, concepts):
    config = replace(SMALL, max_emoji=3, canvas=32)
    near = neighbours(concepts)
    kinds = set()
    for seed in range(200):
        rng = np.random.default_rng(seed)
        left = sample_scene(rng, bank, len(concepts), config)
        right = sample_scene(rng, bank, len(concepts), config)
        text, label = statement(left, right, concepts, near, rng, config)
        true_counts = (f"the left image shows {COUNT_WORDS[len(left.objects)]} emoji, the right image shows "
                       f"{COUNT_WORDS[len(right.objects)]} emoji")
        true_names = (f"the left image shows {describe(left, concepts)}, the right image shows "
                      f"{describe(right, concepts)}")
        kind = "count" if text.endswith(" emoji") else "names"
        kinds.add((kind, label))
        truth = true_counts if kind == "count" else true_names
        assert (text == truth) == label
        if not label and kind == "names":
            said = text.removeprefix("the left image shows ").split(", the right image shows ")
            for side, scene in zip(said, (left, right)):
                changed = [(a, b) for a, b in zip(side.split(" and "), describe(scene, concepts).split(" and "))
                           if a != b]
                if changed:
                    (new, old), = changed
                    new_c = next(c for c in concepts if c.name == new)
                    old_c = next(c for c in concepts if c.name == old)
                    present = {o.concept for o in scene.objects}
                    peers = near[concepts.index(old_c)][0]
                    assert new_c.subgroup == old_c.subgroup or set(peers) <= present
                    assert concepts.index(new_c) not in present
    assert kinds == {("count", True), ("count", False), ("names", True), ("names", False)}


def test_questions_have_ten_correct_answers(bank, concepts):
    config = replace(SMALL, questions_per_image=4, keyword_rate=0.0)
    near = neighbours(concepts)
    seen = set()
    for seed in range(60):
        rng = np.random.default_rng(seed)
        scene = sample_scene(rng, bank, len(concepts), config)
        names = [concepts[o.concept].name for o in scene.objects]
        qs = questions(scene, concepts, near, rng, config)
        assert len({q for q, *_ in qs}) == len(qs) == (4 if len(names) > 1 else 3)
        for q, answers, qtype, atype in qs:
            assert len(answers) == 10
            seen.add((qtype, answers[0]) if atype != "other" or qtype == "which" else (qtype,))
            if qtype == "how many":
                assert answers == [str(len(names))] * 10 and atype == "number"
            elif qtype == "which":
                name = q.removeprefix("which side is the ").removesuffix(" on?")
                assert answers == ["left" if names[0] == name else "right"] * 10
                assert name in (names[0], names[-1])
            elif qtype == "does the":
                name = q.removeprefix("does the image show ").removesuffix("?")
                assert answers == ["yes" if name in names else "no"] * 10 and atype == "yes/no"
            else:
                ordinal = ("first", "second", "third").index(q.split()[3])
                assert answers == [names[ordinal]] * 10
    assert {("does the", "yes"), ("does the", "no"), ("which", "left"), ("which", "right")} <= seen


# -- the world on disk -----------------------------------------------------------------------------------------
def test_world_retrieval_reads_back_through_the_karpathy_reader(world):
    out, _ = world
    images = read_karpathy(out / "karpathy")
    assert [im.split for im in images].count("train") == 12 and len(images) == 22
    assert [im.image_id for im in images] == list(range(22))
    for im in images:
        objects = im.extra["objects"]
        assert im.captions == (" and ".join(o["name"] for o in objects),)  # keyword_rate 0
        alpha = read_mask(mask_path(out / "karpathy", im.path))
        assert alpha.shape == (24, 24)
        inside = np.zeros_like(alpha, dtype=bool)
        for o in objects:
            x0, y0, x1, y1 = o["box"]
            inside[y0:y1, x0:x1] = True
            assert alpha[y0:y1, x0:x1].any()
        assert not alpha[~inside].any()
        with Image.open(im.path) as img:
            assert img.size == (24, 24) and img.mode == "RGB"


def test_world_nlvr2_reads_back_and_labels_match_the_pictures(world, concepts):
    out, _ = world
    for split, n in SMALL.nlvr2.items():
        examples = read_nlvr2_split(out / "nlvr2", split)
        assert len(examples) == n
        for ex in examples:
            assert ex.left.is_file() and ex.right.is_file()
            assert (ex.directory is not None) == (split == "train")
            left = " and ".join(o["name"] for o in ex.extra["left_objects"])
            right = " and ".join(o["name"] for o in ex.extra["right_objects"])
            counts = tuple(len(ex.extra[k]) for k in ("left_objects", "right_objects"))
            truths = {f"the left image shows {left}, the right image shows {right}",
                      (f"the left image shows {COUNT_WORDS[counts[0]]} emoji, the right image shows "
                       f"{COUNT_WORDS[counts[1]]} emoji")}
            assert (ex.sentence in truths) == ex.label


def test_world_vqav2_reads_back(world):
    out, _ = world
    image_ids = set()
    for subtype, n in SMALL.vqav2.items():
        qs = read_vqav2_split(out / "vqav2", subtype)
        assert len({q.image_id for q in qs}) == n and len(qs) == 3 * n
        assert all(len(q.answers) == 10 and q.image.is_file() for q in qs)
        assert all(q.question_id // 1000 == q.image_id for q in qs)
        assert all(mask_path(out / "vqav2", q.image).is_file() for q in qs)
        image_ids |= {q.image_id for q in qs}
    assert len(image_ids) == sum(SMALL.vqav2.values())  # ids unique across subtypes


def test_world_files_are_exactly_what_the_readers_read(world, tmp_path):
    # read each dataset back and write it again through the format's writer: the same bytes / documents
    out, _ = world
    source = out / "karpathy" / "dataset_emoji.json"
    write_karpathy(tmp_path / "k.json", read_karpathy(source, check_images=False), "emoji")
    assert (tmp_path / "k.json").read_bytes() == source.read_bytes()
    for split in SMALL.nlvr2:
        source = out / "nlvr2" / "data" / f"{split}.json"
        write_nlvr2(tmp_path / f"{split}.json", read_nlvr2(source, check_images=False))
        assert (tmp_path / f"{split}.json").read_bytes() == source.read_bytes()
    for subtype in SMALL.vqav2:
        info = json.loads(find_vqav2_files(out / "vqav2", subtype)[0].read_text())["info"]
        questions = read_vqav2_split(out / "vqav2", subtype, check_images=False)
        for again, original in zip(write_vqav2(tmp_path, subtype, questions, "emoji", info),
                                   find_vqav2_files(out / "vqav2", subtype)):
            assert again.name == original.name and again.read_bytes() == original.read_bytes()


def test_world_record(world, concepts):
    out, record = world
    assert read_world(out) == record
    assert record["config"]["canvas"] == 24 and len(record["concepts"]) == len(concepts)
    assert record["sources"]["emoji_test"]["sha256"] and (out / "LICENSES.txt").is_file()
    texts = [c for im in read_karpathy(out / "karpathy") for c in im.captions]
    texts += [ex.sentence for s in SMALL.nlvr2 for ex in read_nlvr2_split(out / "nlvr2", s)]
    assert set(caption_vocabulary(texts)) <= set(record["vocabulary"])
    # the recorded background share is the share measured from the masks on disk
    shares = [patch_foreground(read_mask(p), 4) for p in sorted((out).glob("*/masks/**/*.png"))]
    assert record["patch_background"]["no_foreground"] == pytest.approx(
        float(np.mean([(s == 0).mean() for s in shares])))
    assert 0 < record["patch_background"]["no_foreground"] < 1
    assert all(0 < m < 1 for m in record["image_mean"]) and all(0 < s < 1 for s in record["image_std"])


def test_world_is_determined_by_its_seed(world, concepts, tmp_path):
    out, _ = world
    again = tmp_path / "again"
    write_world(again, SMALL, concepts, SpriteFolder(SPRITES), {"emoji_test": TEST_TXT, "cldr": EN_XML},
                progress=False)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((out / f).read_bytes() == (again / f).read_bytes() for f in files)
    other = tmp_path / "other"
    write_world(other, replace(SMALL, seed=4), concepts, SpriteFolder(SPRITES), progress=False)
    assert (other / "karpathy/dataset_emoji.json").read_bytes() != (out / "karpathy/dataset_emoji.json").read_bytes()


def tree(root):
    """Every file under ``root`` by its relative path, with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_world_written_by_two_workers_is_the_same_bytes(world, concepts, tmp_path):
    # each split of SMALL is drawn in several chunks, so chunk results gathered out of order would show
    assert all(len(_chunks(n, 2)) > 1 for sizes in (SMALL.retrieval, SMALL.nlvr2, SMALL.vqav2)
               for n in sizes.values())
    out, record = world
    two = tmp_path / "two"
    again = write_world(two, SMALL, concepts, SpriteFolder(SPRITES), {"emoji_test": TEST_TXT, "cldr": EN_XML},
                        progress=False, workers=2)
    assert again == record and read_world(two) == read_world(out)
    ones, twos = tree(out), tree(two)
    assert sorted(ones) == sorted(twos)
    assert [f for f in ones if ones[f] != twos[f]] == []


def test_chunks_cover_each_split_in_order():
    for n in (1, 3, 12, 100, 30000):
        for workers in (2, 3, 16):
            chunks = _chunks(n, workers)
            assert [i for a, b in chunks for i in range(a, b)] == list(range(n))
            assert all(b - a <= 64 for a, b in chunks)


def test_write_world_keeps_a_finished_world_and_refuses_other_settings(world, concepts):
    out, record = world
    stamp = (out / "world.json").stat().st_mtime_ns
    assert write_world(out, SMALL, concepts, SpriteFolder(SPRITES), progress=False) == record
    assert (out / "world.json").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="a world with other settings is already there"):
        write_world(out, replace(SMALL, seed=9), concepts, SpriteFolder(SPRITES), progress=False)


def test_world_drops_concepts_drawn_like_an_earlier_one(concepts, tmp_path):
    class MooseLooksLikeFox:
        def sprite(self, concept):
            twin = next(c for c in concepts if c.name == "fox") if concept.name == "moose" else concept
            return SpriteFolder(SPRITES).sprite(twin)

    config = replace(SMALL, retrieval={"train": 30}, nlvr2={"dev": 1}, vqav2={"val": 1})
    record = write_world(tmp_path, config, concepts, MooseLooksLikeFox(), progress=False)
    assert record["dropped_duplicate_pictures"] == ["moose"]
    assert [c["name"] for c in record["concepts"]] == [c.name for c in concepts if c.name != "moose"]
    assert all("moose" not in im.captions[0] for im in read_karpathy(tmp_path / "karpathy"))


def test_read_world_errors(tmp_path):
    with pytest.raises(DataError, match="world.json: missing; write the world first"):
        read_world(tmp_path)
    (tmp_path / "world.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataError, match="not a 'comp-vlm emoji world 1' record"):
        read_world(tmp_path)


def test_world_config_checks():
    with pytest.raises(ConfigError, match="not a multiple of patch"):
        WorldConfig(canvas=42)
    with pytest.raises(ConfigError, match="min_emoji"):
        WorldConfig(min_emoji=3, max_emoji=2)
    with pytest.raises(ConfigError, match="workers must be at least 1"):
        write_world("unused", SMALL, workers=0)
    with pytest.raises(SystemExit):
        main(["unused", "--workers", "0"])
    scaled = WorldConfig().scaled(0.001)
    assert scaled.retrieval == {"train": 30, "val": 1, "test": 5} and scaled.canvas == 40
