"""The guard as a Triton Inference Server Python-backend model (copied by `export-triton` to
REPO/omniguard_guard/1/model.py). It runs the torch-free runtime in the server's Python: omniguard-edge[cpu] (or
[gpu]) must be installed there.

Inputs (all optional, one request each; Triton batches requests, `execute` gets them together): TEXT and RESPONSE
(TYPE_UINT8: UTF-8 bytes), IMAGE, AUDIO and VIDEO (TYPE_UINT8: one encoded file each). Output RESULT (TYPE_UINT8):
the result as UTF-8 JSON, with `flagged` (true for anything not `safe`: fail closed).

Measured with the Triton 2.51 server that nvidia-pytriton 0.7.0 ships (tests/test_triton.py): its Python stub needs
numpy < 2 in the model's environment (with numpy 2.4 a TYPE_STRING input arrived with a corrupt length prefix and
an output arrived empty); bytes travel as UINT8, which needs no string (de)serialization at all.
"""

import json
import os
import site

# Triton's Python stub runs an isolated interpreter: it keeps PYTHONPATH in the environment but not on sys.path.
# The directories named there are added as site directories (their .pth files processed, so an editable or venv
# install of omniguard-edge and numpy is found): start tritonserver with
# PYTHONPATH=<the site-packages where omniguard-edge[cpu] is installed>.
for _path in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    if _path:
        site.addsitedir(_path)

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

FIELDS = (("TEXT", "text"), ("RESPONSE", "response"))
MEDIA = (("IMAGE", "image"), ("AUDIO", "audio"), ("VIDEO", "video"))


def _bytes(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    array = tensor.as_numpy()
    if array.ndim != 2 or array.shape[0] != 1:  # one request, one item: never two prompts judged as one
        raise ValueError(f"{name} has shape {list(array.shape)}: send one item per request, shape [1, bytes]")
    return np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def request_of(request) -> dict:
    """The Guard request (moderate's keyword arguments) of one Triton request."""
    kwargs = {}
    for name, key in FIELDS:
        value = _bytes(request, name)
        if value is not None:
            kwargs[key] = value  # the Guard decodes UTF-8 itself, refusing invalid bytes
    media = [(kind, value) for name, kind in MEDIA if (value := _bytes(request, name))]
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
            data = np.frombuffer(json.dumps(out).encode(), dtype=np.uint8).reshape(1, -1).copy()  # [batch 1, bytes]
            tensor = pb_utils.Tensor("RESULT", data)
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses
