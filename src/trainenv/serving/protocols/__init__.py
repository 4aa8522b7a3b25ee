"""The request and response shapes of the inference protocols other than SageMaker's.

| module | protocol |
|---|---|
| ``kserve`` | KServe's Open Inference Protocol (v2): JSON tensors, ``/infer`` requests and answers |
| ``binary`` | the v2 binary tensor extension: raw tensor data to and from flat lists |
| ``vertex`` | Vertex AI: ``{"instances"}`` -> ``{"predictions"}`` |

These routes are the codec themselves, so ``input_fn``/``output_fn`` are not used there: the
decoded data goes to ``predict_fn(data, model)`` (or, for a ``transform_fn`` handler, to
``transform_fn`` as a JSON body with ``application/json`` both ways).
"""

from __future__ import annotations

import json

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any

from trainenv.serving.api import BadRequest


def load_json_object(body: bytes, what: str) -> dict[str, Any]:
    """``body`` as a JSON object; ``BadRequest`` (400) naming ``what`` otherwise."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"{what} body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise BadRequest(f"{what} body must be a JSON object, got {type(document).__name__}")
    return document
