"""The torch runtime: backbones and the classifier, the training data path and loop, THE prediction
path (torch or ONNX Runtime) and explanations (imports :mod:`pipeline.core`)."""
