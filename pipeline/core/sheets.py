"""Contact sheets: images in rows, each captioned, as one PNG for a person to look at (the
near-duplicates the contract found, the suspected label errors and their evidence)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

#: One tile: an image file and its caption.
Tile = tuple[Path, str]


def contact_grid(
    rows: Sequence[Sequence[Tile]],
    out: Path,
    tile: tuple[int, int] = (200, 150),
    row_notes: Sequence[str] | None = None,
    gap: int = 40,
) -> Path:
    """Write ``rows`` of captioned images (each resized to ``tile``: width, height) as a PNG at
    ``out``; ``row_notes[i]`` is written in the gap after row ``i``'s first image (a similarity,
    an arrow). Returns ``out``."""
    w, h = tile
    text = 16
    cols = max((len(r) for r in rows), default=1)
    sheet = Image.new("RGB", (cols * w + (cols - 1) * gap, max(1, len(rows)) * (h + text + 6)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        y = r * (h + text + 6)
        for c, (path, caption) in enumerate(row):
            with Image.open(path) as im:
                sheet.paste(im.convert("RGB").resize((w, h)), (c * (w + gap), y + text))
            draw.text((c * (w + gap) + 2, y + 2), caption, fill="black")
        if row_notes is not None and r < len(row_notes):
            draw.text((w + 4, y + text + h // 2), row_notes[r], fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
