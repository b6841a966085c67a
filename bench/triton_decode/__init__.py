"""The design Triton's own examples recommend, for ``make bench`` only: JPEG bytes straight into an ensemble whose
first step decodes in a Python-backend model (:mod:`bench.triton_decode.model`, copied into the private
repository :mod:`bench.triton_decode.repository` builds under ``.cache/bench/``), then the classifier and softmax."""
