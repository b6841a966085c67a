"""Model building, training, evaluation and export (uses torch; never imported by serving code).

The command-line tools are the modules at this level (``python -m training.<tool>``): ``train``, ``average``,
``onnx_export``, ``export_imagenet``, ``evaluate``, ``quantize``, ``compare``, ``publish``, ``pipeline``
(the research pipeline, all of them in order) and ``recipes`` (one command per served model: the chain that made
it, up to a published version). They are thin ``main``s over the packages, in pipeline order:

* :mod:`training.data`: sources, augmentation, catalog-style photos, uploads through the preprocess code;
* :mod:`training.nets`: every network and the uint8-NHWC wrapper;
* :mod:`training.fit`: the training loop;
* :mod:`training.onnx`: export, ONNX Runtime inference, INT8 building blocks;
* :mod:`training.report`: metrics, plots, model cards, run directories;
* :mod:`training.repository`: the recipe in ``config.pbtxt`` and the model-repository layout publish writes.
"""
