"""Vertex AI's predict shape (``AIP_PREDICT_ROUTE``).

``{"instances": [...], "parameters": {...}}`` -> ``predict_fn(instances, model)`` ->
``{"predictions": [...]}``. The prediction must be a list (one per instance; numpy arrays are
converted). ``parameters`` is in ``context.parameters``.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any

from trainenv.serving import codecs
from trainenv.serving.api import BadRequest
from trainenv.serving.protocols import load_json_object


def parse_request(body: bytes) -> tuple[list[Any], Any]:
    """``(instances, parameters)`` of a Vertex predict request; ``BadRequest`` if malformed."""
    document = load_json_object(body, "Vertex AI predict")
    instances = document.get("instances")
    if not isinstance(instances, list):
        raise BadRequest('Vertex AI predict body needs "instances": a list')
    return instances, document.get("parameters")


def response(prediction: Any) -> bytes:
    """``{"predictions": [...]}``; ``TypeError`` when the prediction is not a list."""
    plain = codecs.plain_value(prediction)
    if isinstance(plain, tuple):
        plain = list(plain)
    if not isinstance(plain, list):
        raise TypeError(
            f"for Vertex AI, predict_fn must return a list (one prediction per instance), got {type(prediction).__name__}"
        )
    try:
        return codecs.to_json({"predictions": plain})
    except codecs.CannotEncode as exc:
        raise TypeError(f"the prediction is not JSON serializable: {exc}") from None
