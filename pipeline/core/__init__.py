"""The core layer: what every other part of lesionflow builds on (standard library, NumPy, pandas,
PyYAML and Pillow only; never imports a higher layer). See docs/architecture.md."""
