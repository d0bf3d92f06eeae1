"""The dataset: the data contract and its report, near-duplicates, the leakage-free split, the split
files and the ingest of new labelled data (imports only :mod:`pipeline.core`)."""
