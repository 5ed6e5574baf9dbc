"""The sources of the emoji world: real images and human-written names, offline, from three Debian packages.

- ``unicode-data``: ``emoji-test.txt`` lists every emoji with its status, group, subgroup and Unicode name.
- ``unicode-cldr-core``: CLDR ``annotations/en.xml`` gives each emoji a short name (``type="tts"``) and keywords.
- ``fonts-noto-color-emoji``: ``NotoColorEmoji.ttf`` holds colour bitmaps; Pillow renders a glyph only at the
  bitmap size (109), about 136x128 RGBA with a clean alpha channel.

A *concept* is one fully-qualified emoji of ``emoji-test.txt`` without skin tones, by default with at most two code
points (``U+2764 U+FE0F`` counts as two) and no flags: 1,372 in Emoji 15.0. Its name is CLDR's short name, or the
Unicode name where CLDR has none (the 21 emoji added in 15.0 are missing from CLDR 41; where both exist they are
equal). :class:`FontGlyphs` renders concepts from the font; :class:`SpriteFolder` reads pre-rendered sprites
(the test fixtures), so everything downstream runs without the packages.
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import DataError
from .files import PathLike

FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
CLDR_PATH = Path("/usr/share/unicode/cldr/common/annotations/en.xml")
EMOJI_TEST_PATH = Path("/usr/share/unicode/emoji/emoji-test.txt")
#: the Debian package of each source file
PACKAGES = {"font": "fonts-noto-color-emoji", "cldr": "unicode-cldr-core", "emoji_test": "unicode-data"}
APT_COMMAND = "apt-get update && apt-get install -y " + " ".join(PACKAGES.values())
FONT_SIZE = 109  # the only size at which NotoColorEmoji's bitmaps render
SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))
VARIATION_SELECTOR = 0xFE0F
_LINE = re.compile(r"^([0-9A-F ]+?)\s*;\s*([a-z-]+)\s*#\s*\S+\s+E\d+\.\d+\s+(.+)$")


@dataclass(frozen=True)
class EmojiEntry:
    """One line of ``emoji-test.txt``."""

    code_points: tuple[int, ...]
    status: str
    name: str
    group: str
    subgroup: str


@dataclass(frozen=True)
class Concept:
    """An emoji the world can draw and name."""

    code_points: tuple[int, ...]
    name: str
    keywords: tuple[str, ...]
    group: str
    subgroup: str

    @property
    def char(self) -> str:
        return "".join(map(chr, self.code_points))

    @property
    def key(self) -> str:
        """Code points in lower-case hex joined by ``_`` (``2764_fe0f``): the concept's file-name stem."""
        return "_".join(f"{c:x}" for c in self.code_points)


def require_source(path: PathLike, package: str) -> Path:
    """``path`` if it exists; otherwise a one-line :class:`DataError` naming the Debian package that provides it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} is missing: install the Debian package {package} "
                        f"(as root: apt-get update && apt-get install -y {package})")
    return path


def parse_emoji_test(text: str, source: str = "emoji-test.txt") -> list[EmojiEntry]:
    """Every entry of an ``emoji-test.txt`` text, with its group and subgroup."""
    entries: list[EmojiEntry] = []
    group = subgroup = ""
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line.strip() and not line.startswith("#"):
            m = _LINE.match(line.strip())
            if m is None:
                raise DataError(f"{source}: line {number}: not 'code points ; status # emoji E<version> name'")
            if not group or not subgroup:
                raise DataError(f"{source}: line {number}: entry before any '# group:' / '# subgroup:' line")
            cps = tuple(int(c, 16) for c in m.group(1).split())
            entries.append(EmojiEntry(cps, m.group(2), m.group(3).strip(), group, subgroup))
    if not entries:
        raise DataError(f"{source}: no emoji entries")
    return entries


def parse_cldr_annotations(text: str, source: str = "en.xml") -> dict[str, tuple[str | None, tuple[str, ...]]]:
    """CLDR annotations: emoji (without U+FE0F, as CLDR stores them) -> (short name or None, keywords)."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise DataError(f"{source}: malformed XML ({exc})") from None
    names: dict[str, str] = {}
    keywords: dict[str, tuple[str, ...]] = {}
    for node in root.iter("annotation"):
        cp, value = node.get("cp"), (node.text or "").strip()
        if not cp or not value:
            continue
        if node.get("type") == "tts":
            names[cp] = value
        else:
            keywords[cp] = tuple(k.strip() for k in value.split("|") if k.strip())
    if not names:
        raise DataError(f"{source}: no type=\"tts\" annotations")
    return {cp: (names.get(cp), keywords.get(cp, ())) for cp in names.keys() | keywords.keys()}


def select_concepts(entries: Sequence[EmojiEntry], annotations: dict[str, tuple[str | None, tuple[str, ...]]],
                    max_code_points: int | None = 2, include_flags: bool = False) -> list[Concept]:
    """Concepts in ``emoji-test.txt`` order: fully-qualified entries without skin tones (nor flags, unless
    ``include_flags``), with at most ``max_code_points`` code points (``None``: any). Names come from CLDR where it
    has the emoji, else from ``emoji-test.txt``; keywords equal to the name are dropped."""
    concepts, seen = [], set()
    for e in entries:
        if e.status != "fully-qualified" or SKIN_TONES & set(e.code_points):
            continue
        if (e.group == "Flags" and not include_flags) or (max_code_points and len(e.code_points) > max_code_points):
            continue
        name, keywords = annotations.get("".join(chr(c) for c in e.code_points if c != VARIATION_SELECTOR),
                                         (None, ()))
        name = name or e.name
        if name.lower() in seen:
            continue  # two entries with one name cannot be told apart by their captions
        seen.add(name.lower())
        concepts.append(Concept(e.code_points, name, tuple(k for k in keywords if k.lower() != name.lower()),
                                e.group, e.subgroup))
    return concepts


def load_concepts(emoji_test: PathLike = EMOJI_TEST_PATH, cldr: PathLike = CLDR_PATH,
                  max_code_points: int | None = 2, include_flags: bool = False) -> list[Concept]:
    """:func:`select_concepts` over the installed (or given) ``emoji-test.txt`` and CLDR ``en.xml``."""
    test_path = require_source(emoji_test, PACKAGES["emoji_test"])
    cldr_path = require_source(cldr, PACKAGES["cldr"])
    return select_concepts(parse_emoji_test(test_path.read_text(encoding="utf-8"), str(test_path)),
                           parse_cldr_annotations(cldr_path.read_text(encoding="utf-8"), str(cldr_path)),
                           max_code_points, include_flags)


def file_digest(path: PathLike) -> str:
    """sha256 of a source file (recorded with the world, so a world names the exact data it came from)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def crop_to_alpha(image: Any) -> Any:
    """An RGBA image cropped to the bounding box of its non-transparent pixels."""
    box = image.getchannel("A").getbbox()
    if box is None:
        raise DataError("the glyph rendered as an empty image")
    return image.crop(box)


class GlyphSource(Protocol):
    def sprite(self, concept: Concept) -> Any:
        """The concept's picture as an RGBA PIL image cropped to its alpha bounding box."""


class FontGlyphs:
    """Renders concepts from the colour emoji font (``embedded_color`` at the bitmap size)."""

    def __init__(self, font_path: PathLike = FONT_PATH) -> None:
        from PIL import ImageFont, features

        path = require_source(font_path, PACKAGES["font"])
        self.font = ImageFont.truetype(str(path), FONT_SIZE)
        self.complex_layout = bool(features.check("raqm"))
        self.path = path

    def sprite(self, concept: Concept) -> Any:
        from PIL import Image, ImageDraw

        if sum(c != VARIATION_SELECTOR for c in concept.code_points) > 1 and not self.complex_layout:
            raise DataError(f"{concept.name!r} is a sequence of code points: rendering it needs Pillow with libraqm "
                            "(Debian package libraqm0)")
        _, _, right, bottom = self.font.getbbox(concept.char)
        canvas = Image.new("RGBA", (right + 4, bottom + 4), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((0, 0), concept.char, font=self.font, embedded_color=True)
        try:
            return crop_to_alpha(canvas)
        except DataError:
            raise DataError(f"{self.path}: no glyph for {concept.name!r} ({concept.key})") from None


class SpriteFolder:
    """Pre-rendered sprites ``<folder>/<concept.key>.png`` (RGBA), e.g. the committed test fixtures."""

    def __init__(self, folder: PathLike) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DataError(f"{self.folder}: no such sprite folder")

    def sprite(self, concept: Concept) -> Any:
        from PIL import Image

        path = self.folder / f"{concept.key}.png"
        if not path.is_file():
            raise DataError(f"{path}: missing sprite of {concept.name!r}")
        with Image.open(path) as img:
            return crop_to_alpha(img.convert("RGBA"))


__all__ = ["APT_COMMAND", "CLDR_PATH", "EMOJI_TEST_PATH", "FONT_PATH", "PACKAGES", "Concept", "EmojiEntry",
           "FontGlyphs", "GlyphSource", "SpriteFolder", "crop_to_alpha", "file_digest", "load_concepts",
           "parse_cldr_annotations", "parse_emoji_test", "require_source", "select_concepts"]
