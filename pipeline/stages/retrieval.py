"""Stage ``retrieval``: the index of similar confirmed cases (:mod:`pipeline.model.retrieval`),
packaged with the model.

    python -m pipeline.stages.retrieval [--model DIR] [--splits DIR] [--images DIR] [--out DIR]

Embeds every image of the training split with the trained model (the plain view, as a query is
embedded), L2-normalises the embeddings (float16), keeps each case's lesion, diagnosis, how it was
confirmed and metadata, and a small JPEG thumbnail, and writes ``artifacts/retrieval/`` whole or
not at all. Reads the ``retrieval`` section of params.yaml.
"""

from __future__ import annotations

import sys
from argparse import Namespace

from pipeline.core import lineage, params, stagecli
from pipeline.core.errors import EXIT_OK
from pipeline.core.layout import LAYOUT
from pipeline.data import splits
from pipeline.model import bundle, retrieval
from pipeline.model.inference import load_model


def body(args: Namespace) -> int:
    p = params.load_section("retrieval", args.params)
    frame = splits.read_split(args.splits, "train")
    files = splits.image_files(frame, args.images, LAYOUT.split_file("train", args.splits))
    predictor = load_model(args.model)
    meta = {
        "model_md5": bundle.model_md5(args.model),
        "lineage": lineage.lineage(
            params={"retrieval": params.to_dict(p)},
            files=[args.model / bundle.MODEL_FILE, LAYOUT.split_file("train", args.splits)],
        ),
    }
    info = retrieval.build_index(predictor, frame, files, args.out, p, meta, progress=not args.no_progress)
    mb = sum(info["bytes"].values()) / 1e6
    print(
        f"retrieval: {info['n']:,} training images of {info['lesions']:,} lesions indexed "
        f"({info['dim']}-d embeddings, thumbnails {info['thumbnail_size'][1]}x{info['thumbnail_size'][0]}; "
        f"{mb:.1f} MB) -> {args.out}"
    )
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return stagecli.run("retrieval", __doc__, body, argv)


if __name__ == "__main__":
    sys.exit(main())
