"""Benchmark: which near-duplicate detector should the data contract use?

Side by side in one run, over HAM10000 (``data/``):

* the baseline a user would otherwise write: a 64-bit perceptual hash (``imagehash.phash``),
  pairs within Hamming distance ``--phash-distance`` (default 2);
* :mod:`pipeline.data.neardup` (coarse-shape candidates confirmed by fine detail), what
  ``validate`` and ``ingest`` run.

Ground truth is built from real images: ``--copies`` images drawn at random, each copied six
ways (half size; 2/3 size at JPEG quality 50; JPEG quality 40; a centred 6 % crop of each side; a
colour shift: red x1.12, blue x0.9, brightness x1.1; all together: 3 % crop, 3/4 size, saturation
x0.8, JPEG 60) plus an
off-centre crop (12 % off one corner: beyond what the method claims, reported apart). A copy is
found when the detector pairs it with its own original among all 10,015 images; a pair with any
other image (not a copy of its original) is a false pair. Recall = found / copies; precision =
true pairs / all pairs the copies got. On HAM10000 itself: how many pairs each method reports
across lesion_ids (the data's own near-duplicates), with a contact sheet of the neardup pairs to
look at (``benchmarks/results/near_duplicates_ham10000.png``). Timing: thumbnails of every image
and the pair search over all of them, on this machine's cores.

Run from the project root: ``python benchmarks/near_duplicates.py`` ->
benchmarks/results/near_duplicates.json
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image, ImageEnhance  # noqa: E402

from benchmarks._machine import machine  # noqa: E402
from pipeline.core.workers import map_chunks  # noqa: E402
from pipeline.data import neardup  # noqa: E402

KINDS = ("half_size", "two_thirds_jpeg50", "jpeg40", "crop6", "colour", "combined")


def copies_of(img: Image.Image) -> dict[str, Image.Image]:
    """The copies of one image (see the module docstring), decoded as a user would load them."""
    w, h = img.size

    def jpeg(im: Image.Image, q: int) -> Image.Image:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=q)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

    c, d = int(w * 0.06), int(h * 0.06)
    r, g, b = img.split()
    shifted = Image.merge("RGB", (r.point(lambda v: min(255, int(v * 1.12))), g, b.point(lambda v: int(v * 0.9))))
    combined = img.crop((c // 2, d // 2, w - c // 2, h - d // 2)).resize((w * 3 // 4, h * 3 // 4))
    return {
        "half_size": img.resize((w // 2, h // 2)),
        "two_thirds_jpeg50": jpeg(img.resize((w * 2 // 3, h * 2 // 3)), 50),
        "jpeg40": jpeg(img, 40),
        "crop6": img.crop((c, d, w - c, h - d)),
        "colour": ImageEnhance.Brightness(shifted).enhance(1.1),
        "combined": jpeg(ImageEnhance.Color(combined).enhance(0.8), 60),
        "offcentre_crop12": img.crop((2 * c, 0, w, h - 2 * d)),
    }


def _phash_chunk(paths: list[str]) -> list[int]:
    import imagehash

    return [int(str(imagehash.phash(Image.open(p))), 16) for p in paths]


def _thumb_chunk(paths: list[str]) -> list[np.ndarray]:
    return [neardup.file_thumbnail(p) for p in paths]


def _popcount(x: np.ndarray) -> np.ndarray:
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(-1)


def phash_pairs(q: np.ndarray, r: np.ndarray, max_distance: int, within: bool) -> list[tuple[int, int]]:
    """Pairs (query, reference) within ``max_distance`` bits."""
    out = []
    for i in range(len(q)):
        d = _popcount(np.bitwise_xor(r, q[i]))
        for j in np.flatnonzero(d <= max_distance):
            if not within or j > i:
                out.append((i, int(j)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT / "data")
    ap.add_argument("--copies", type=int, default=300, help="originals copied (each six ways)")
    ap.add_argument("--phash-distance", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/near_duplicates.json")
    args = ap.parse_args(argv)
    import imagehash

    meta = pd.read_csv(args.data / "HAM10000_metadata.csv", dtype=str)
    paths = [str(args.data / "images" / f"{i}.jpg") for i in meta["image_id"]]
    lesion = meta["lesion_id"].to_numpy()

    t0 = time.perf_counter()
    thumbs = np.stack(map_chunks(_thumb_chunk, paths, chunk_size=256, desc="thumbnails"))
    t_thumbs = time.perf_counter() - t0
    t0 = time.perf_counter()
    ham_pairs = neardup.find_pairs(thumbs, list(meta["image_id"]))
    t_pairs = time.perf_counter() - t0
    t0 = time.perf_counter()
    hashes = np.array(map_chunks(_phash_chunk, paths, chunk_size=256, desc="phash"), dtype=np.uint64)
    ham_phash = phash_pairs(hashes, hashes, args.phash_distance, within=True)
    t_phash = time.perf_counter() - t0
    t_validate = _validate_seconds(args.data)
    lesion_of = dict(zip(meta["image_id"], lesion))
    cross = [p for p in ham_pairs if lesion_of[p.a] != lesion_of[p.b]]
    cross_phash = [(i, j) for i, j in ham_phash if lesion[i] != lesion[j]]

    rng = np.random.default_rng(args.seed)
    chosen = rng.choice(len(meta), args.copies, replace=False)
    copy_thumbs: dict[str, list[np.ndarray]] = {}
    copy_hashes: dict[str, list[int]] = {}
    for i in chosen:
        with Image.open(paths[i]) as im:
            for kind, cp in copies_of(im.convert("RGB")).items():
                copy_thumbs.setdefault(kind, []).append(neardup.thumbnail(cp))
                copy_hashes.setdefault(kind, []).append(int(str(imagehash.phash(cp)), 16))
    ids = list(meta["image_id"])
    results: dict[str, dict] = {}
    for kind in copy_thumbs:
        q = np.stack(copy_thumbs[kind])
        found = neardup.find_pairs(q, [str(k) for k in range(len(q))], reference=thumbs, reference_ids=ids)
        qh = np.array(copy_hashes[kind], dtype=np.uint64)
        ph = phash_pairs(qh, hashes, args.phash_distance, within=False)
        results[kind] = {
            "neardup": _score([(int(p.a), ids.index(p.b)) for p in found], chosen, lesion),
            "phash": _score(ph, chosen, lesion),
        }
    total = {m: _total([results[k][m] for k in KINDS], int(args.copies)) for m in ("neardup", "phash")}
    report = {
        "benchmark": "near_duplicates",
        "machine": machine(),
        "images": len(meta),
        "copies_per_kind": int(args.copies),
        "method": {
            "thumb": neardup.THUMB,
            "coarse": neardup.COARSE,
            "detail": neardup.DETAIL,
            "scales": list(neardup.SCALES),
            "candidates": neardup.CANDIDATES,
            "min_coarse": neardup.MIN_COARSE,
            "min_detail": neardup.MIN_DETAIL,
        },
        "baseline": f"imagehash.phash, Hamming distance <= {args.phash_distance}",
        "seconds": {
            "thumbnails": round(t_thumbs, 2),
            "pairs": round(t_pairs, 2),
            "phash_all": round(t_phash, 2),
            **{f"validate_near_duplicates_{k}": v for k, v in t_validate.items()},
        },
        "copies": results,
        "copies_total_excluding_offcentre": total,
        "ham10000": {
            "neardup_pairs": len(ham_pairs),
            "neardup_pairs_across_lesions": len(cross),
            "neardup_cross_lesion_pairs": [[p.a, p.b, p.coarse, p.detail] for p in cross],
            "phash_pairs": len(ham_phash),
            "phash_pairs_across_lesions": len(cross_phash),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    captions = {i: f"{i} {les} {dx}" for i, les, dx in zip(meta["image_id"], meta["lesion_id"], meta["dx"])}
    path_of = {i: args.data / "images" / f"{i}.jpg" for i in meta["image_id"]}
    neardup.contact_sheet(cross, path_of, args.out.with_name("near_duplicates_ham10000.png"), captions)
    print(json.dumps({k: report[k] for k in ("seconds", "copies_total_excluding_offcentre")}, indent=2))
    print(f"HAM10000 pairs across lesions: neardup {len(cross)}, phash {len(cross_phash)}; -> {args.out}")
    return 0


def _validate_seconds(data: Path) -> dict[str, float]:
    """The whole data contract over ``data`` (as the validate stage runs it), with the near-duplicate
    check and without it."""
    import dataclasses

    from pipeline.core import params
    from pipeline.data import contract

    pfile = ROOT / "params.yaml"
    p = params.load_section("validate", pfile)
    meta, dx = params.load_section("metadata", pfile), params.load_taxonomy(pfile).diagnoses
    out = {}
    for mode in ("off", "warn"):
        t0 = time.perf_counter()
        contract.validate(data / "HAM10000_metadata.csv", data / "images", dataclasses.replace(p, near_duplicates=mode),
                          meta, dx, progress=False)  # fmt: skip
        out[mode] = round(time.perf_counter() - t0, 2)
    return out


def _score(pairs: list[tuple[int, int]], chosen: np.ndarray, lesion: np.ndarray) -> dict:
    """Recall and precision of the pairs (copy index, reference index) against the originals."""
    true = {(k, int(o)) for k, o in enumerate(chosen)}
    # a pair with another image of the original's lesion is not wrong (re-photographs)
    ok = [(k, j) for k, j in pairs if (k, j) in true or lesion[j] == lesion[chosen[k]]]
    found = {k for k, j in pairs if (k, j) in true}
    return {
        "found": len(found),
        "recall": round(len(found) / len(chosen), 4),
        "pairs": len(pairs),
        "false_pairs": len(pairs) - len(ok),
        "precision": round(len(ok) / len(pairs), 4) if pairs else None,
    }


def _total(rows: list[dict], copies: int) -> dict:
    """The kinds together: copies found of all made, and the precision of every pair reported."""
    found, pairs, false = (sum(r[k] for r in rows) for k in ("found", "pairs", "false_pairs"))
    return {
        "copies": copies * len(rows),
        "found": found,
        "recall": round(found / (copies * len(rows)), 4),
        "recall_worst_kind": min(r["recall"] for r in rows),
        "pairs": pairs,
        "false_pairs": false,
        "precision": round((pairs - false) / pairs, 4) if pairs else None,
    }


if __name__ == "__main__":
    sys.exit(main())
