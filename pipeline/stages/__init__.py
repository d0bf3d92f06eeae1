"""The DVC stages, one thin module each (``python -m pipeline.stages.<stage>``): read the stage's
params section, call library functions, write outputs. No stage imports another stage."""
