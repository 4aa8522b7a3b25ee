"""A SageMaker script: arguments and SM_* variables in, a model file out."""

import argparse
import json
import os

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--lr", type=float, default=0.1)
parser.add_argument("--model-dir", default=os.environ["SM_MODEL_DIR"])
args = parser.parse_args()

weight = sum(args.lr / (epoch + 1) for epoch in range(args.epochs))
with open(os.path.join(args.model_dir, "model.json"), "w") as handle:
    json.dump({"weight": weight, "hosts": json.loads(os.environ["SM_HOSTS"])}, handle)
print(f"trained {args.epochs} epochs, weight {weight:.3f}, model in {args.model_dir}")
