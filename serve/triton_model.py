"""The guard as a Triton Inference Server Python-backend model (copied by `export-triton` to
REPO/omniguard_guard/1/model.py). It runs the torch-free runtime in the server's Python: omniguard-edge[cpu] (or
[gpu]) must be installed there.

Inputs (all optional, one request each; Triton batches requests, `execute` gets them together):
TEXT and RESPONSE (TYPE_STRING, one UTF-8 string), IMAGE, AUDIO and VIDEO (TYPE_STRING, any number of encoded files).
Output RESULT (TYPE_STRING): the result as JSON, with `flagged` (true for anything not `safe`: fail closed).
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

FIELDS = (("TEXT", "text"), ("RESPONSE", "response"))
MEDIA = (("IMAGE", "image"), ("AUDIO", "audio"), ("VIDEO", "video"))


def request_of(request) -> dict:
    """The Guard request (moderate's keyword arguments) of one Triton request."""
    kwargs = {}
    for name, key in FIELDS:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is not None:
            values = tensor.as_numpy().reshape(-1)
            if values.size:
                kwargs[key] = bytes(values[0])  # the Guard decodes UTF-8 itself, refusing invalid bytes
    media = []
    for name, kind in MEDIA:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is not None:
            media.extend((kind, bytes(item)) for item in tensor.as_numpy().reshape(-1))
    if media:
        kwargs["media"] = media
    return kwargs


class TritonPythonModel:
    def initialize(self, args):
        from omniguard_edge.runtime.guard import Guard, GuardOptions

        params = json.loads(args["model_config"]).get("parameters", {})
        bundle = params["bundle"]["string_value"]
        mode = params.get("mode", {}).get("string_value", "categories")
        self.guard = Guard.from_bundle(bundle, GuardOptions(mode=mode))

    def execute(self, requests):
        batch = []
        for request in requests:
            try:
                batch.append(request_of(request))
            except Exception as exc:  # an unreadable request is judged as nothing: an error result, flagged
                batch.append({"text": None, "_error": f"{type(exc).__name__}: {exc}"})
        results = self.guard.moderate_batch([{k: v for k, v in b.items() if k != "_error"} for b in batch])
        responses = []
        for kwargs, result in zip(batch, results):
            out = result.to_dict()
            if "_error" in kwargs:
                out.update(verdict="error", error=kwargs["_error"])
            out["flagged"] = out["verdict"] != "safe"
            tensor = pb_utils.Tensor("RESULT", np.array([json.dumps(out).encode()], dtype=np.object_))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses
