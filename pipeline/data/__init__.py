"""The dataset: the data contract, the leakage-free split and the split files (imports only
:mod:`pipeline.core`)."""
