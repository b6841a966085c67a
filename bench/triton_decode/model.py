"""Triton Python model ``jpeg_decode``: encoded image bytes → the classifier's uint8 (H, W, C) input.

The one copy of this step: :mod:`bench.triton_decode.repository` copies this file into
``<private repository>/jpeg_decode/1/model.py``. It runs the project's own
:func:`services.preprocess.imaging.preprocess` (the repository's root comes in the config parameter
``source_root``) with the recipe of the ``preprocess.*`` parameters and the dims of the ``image``
output, both written from the public ensemble's ``config.pbtxt``. One image per thread, as the
preprocess service decodes; an image that does not decode fails its own request only.
"""
import json
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        if params["source_root"] not in sys.path:
            sys.path.insert(0, params["source_root"])
        import cv2

        from services.common.errors import InvalidInput
        from services.common.spec import Spec
        from services.preprocess.imaging import preprocess

        cv2.setNumThreads(1)
        self.preprocess, self.invalid_input = preprocess, InvalidInput
        image = next(o for o in config["output"] if o["name"] == "image")
        self.spec = Spec.from_parameters([int(d) for d in image["dims"]], params)
        self.max_pixels = int(params.get("max_pixels", "50000000"))

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            encoded = pb_utils.get_input_tensor_by_name(request, "jpeg").as_numpy()  # (batch, 1) of bytes
            try:
                pixels = np.stack([self.preprocess(bytes(row[0]), self.spec, self.max_pixels).pixels
                                   for row in encoded])
            except self.invalid_input as error:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error))))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("image", pixels)]))
        return responses
