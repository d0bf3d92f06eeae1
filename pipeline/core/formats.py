"""The image formats lesionflow accepts: PIL's format names and their file extensions (shared by
the decoder, :mod:`pipeline.core.images`, and the data contract's parameters)."""

#: Formats accepted by default (PIL's names).
FORMATS: tuple[str, ...] = ("JPEG", "PNG")
#: File extensions of those formats (lower case; matched case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")
