"""lesionflow's pipeline, in layers (docs/architecture.md draws them; a lower layer never imports a
higher one):

``core`` (params, taxonomy, images, layout, lineage, files, prediction rows, errors) <
``data``, ``features`` (no torch) < ``model`` (torch) < ``evaluation``, ``monitoring`` <
``serving`` < ``stages`` (one thin module per DVC stage) < ``cli`` (the ``lesionflow`` command).
"""

__version__ = "0.1.0"
