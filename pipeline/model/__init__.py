"""The torch runtime: backbones and the classifier, the training data path, loop and patience loop,
THE prediction path (torch or ONNX Runtime), explanations, calibration and the OOD detector, and
the packaged model's folder (:mod:`pipeline.model.bundle`, torch-free). Imports :mod:`pipeline.core`
and :mod:`pipeline.data`."""
