"""An entry function: trainenv calls ``main(**hyperparameters)`` with decoded values."""

import json
import os


def main(lr: float, epochs: int = 1, layers=(8,)):
    """``lr=0.1``, ``epochs=3`` and ``layers=[16, 8]`` arrive as a float, an int and a list."""
    model = {"lr": lr, "epochs": epochs, "layers": list(layers), "types": [type(v).__name__ for v in (lr, epochs, layers)]}
    with open(os.path.join(os.environ["TRAINENV_MODEL_DIR"], "model.json"), "w") as handle:
        json.dump(model, handle)
    print(f"trained: {model}")
