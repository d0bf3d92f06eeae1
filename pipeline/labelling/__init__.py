"""The labelling loop over the library: which unlabelled images to label next and the folder a
labelling team works from (:mod:`pipeline.labelling.queue`)."""
