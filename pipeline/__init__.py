"""lesionflow's pipeline: one module per DVC stage plus small shared library modules.

Stage modules (each one DVC stage, a pure function behind a thin ``main()``):
``validate``, ``split``, ``eda``, ``train``, ``evaluate``.

Library modules (one owner per concept, imported by stages, flows and the service):
``params`` (reads params.yaml), ``taxonomy`` (diagnoses -> risk / binary classes),
``images`` (decodes images), ``lineage`` (git commit, data md5, versions), ``fsutil`` (atomic writes).
"""

__version__ = "0.1.0"
