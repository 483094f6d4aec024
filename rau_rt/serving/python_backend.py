"""The Triton Python-backend model of a generated repository (`rau-rt triton-repo`).

The repository's `model.py` imports `TritonPythonModel` from here, so a production
tritonserver runs the same `LocalizerService` as `rau-rt serve-localizer`. Its settings come
from the model's `config.pbtxt` parameters: "bundle" (a path, relative to the model's
folder unless absolute), "max_references", "max_cache_mb", "backend", "intra_op_threads".
`triton_python_backend_utils` exists only inside the Python-backend stub; it is imported
there, when the model is initialized.
"""

from __future__ import annotations

import json
from pathlib import Path


class TritonPythonModel:
    """Triton's Python-backend model interface (initialize, execute, finalize)."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        from rau_rt.config import EngineConfig
        from rau_rt.localization import wire
        from rau_rt.serving.server import load_vlm
        from rau_rt.serving.service import LocalizerService, ServiceConfig

        self._utils, self._wire = pb_utils, wire
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        bundle = Path(parameters["bundle"])
        if not bundle.is_absolute():
            bundle = Path(args["model_repository"]) / bundle
        threads = int(parameters.get("intra_op_threads", "0"))
        self._bundle, _ = load_vlm(bundle, parameters.get("backend") or None,
                                   EngineConfig(intra_op_threads=threads))
        defaults = ServiceConfig()
        self._service = LocalizerService(self._bundle, ServiceConfig(
            max_references=int(parameters.get("max_references", defaults.max_references)),
            max_cache_mb=float(parameters.get("max_cache_mb", defaults.max_cache_mb))))

    def execute(self, requests: list) -> list:
        pb_utils = self._utils
        pairs = [(pb_utils.get_input_tensor_by_name(r, "request").as_numpy(),
                  pb_utils.get_input_tensor_by_name(r, "data").as_numpy().reshape(-1))
                 for r in requests]
        return [pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("response", self._wire.encode_response(answer).reshape(1, 1))])
            for answer in self._service.answer(pairs)]

    def finalize(self) -> None:
        self._bundle.close()
