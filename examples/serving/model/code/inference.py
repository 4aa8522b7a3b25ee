"""A SageMaker-style handler for trainenv: a linear model stored as JSON in the model dir.

Nothing here is trainenv-specific except the optional ``BadRequest``: the same file runs
under SageMaker's inference toolkits. trainenv decodes the body (JSON, CSV, JSON Lines, .npy)
with its default ``input_fn`` and encodes the answer in the type the client accepts.
"""

import json
import os

from trainenv.serving import BadRequest


def model_fn(model_dir):
    """Called once per process before /ping answers 200."""
    with open(os.path.join(model_dir, "model.json")) as handle:
        return json.load(handle)


def predict_fn(data, model):
    """``data``: one row or a list of rows of numbers (JSON ``[[...]]`` or CSV lines)."""
    rows = data if data and isinstance(data[0], list) else [data]
    width = len(model["weights"])
    scores = []
    for row in rows:
        if len(row) != width or not all(isinstance(x, (int, float)) for x in row):
            raise BadRequest(f"each row needs {width} numbers ({', '.join(model['features'])})")
        scores.append(sum(w * x for w, x in zip(model["weights"], row)) + model["bias"])
    return scores


def ready_fn(model):
    """Deep health check: /ping stays 503 while this is false."""
    return len(model["weights"]) > 0
