"""Image statistics: per-image features, lesion segmentation and colours, the feature-only baseline
format (NumPy/SciPy; imports only :mod:`pipeline.core`)."""
