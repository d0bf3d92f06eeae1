"""lesionflow's pipeline, in layers (docs/architecture.md draws them; a lower layer never imports a
higher one, and ``tools/codemap.py`` checks it):

``core`` (params, taxonomy, images, layout, the stage list, lineage, files, prediction rows and the
decision rule, errors) < ``data``, ``features`` (no torch) < ``model`` (torch; and the packaged
model's folder) < ``evaluation``, ``monitoring`` < ``registry`` (the model store) < ``serving``,
``audit`` < ``stages`` (one thin module per DVC stage) < ``flows`` (Prefect, orchestration only)
< ``cli`` (the ``lesionflow`` command).
"""

__version__ = "0.1.0"
