"""Packaging and serving: the BentoML model store (registry), request parsing, batching, the
service and its web page (imports the layers below; never a stage)."""
