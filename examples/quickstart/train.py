"""A tiny training job that needs nothing but the standard library and trainenv.

It fits y = w * x + b to ``train/points.csv`` with gradient descent and writes the model to
the model dir. Run it with ``trainenv local`` (see the README) or inside any trainenv image.
"""

import argparse
import csv
import json
import os
import sys

from trainenv import training_env


def load_points(channel_dir):
    points = []
    for name in sorted(os.listdir(channel_dir)):
        if name.endswith(".csv"):
            with open(os.path.join(channel_dir, name), newline="") as handle:
                for row in csv.DictReader(handle):
                    points.append((float(row["x"]), float(row["y"])))
    if not points:
        sys.exit(f"no CSV rows found in {channel_dir}")
    return points


def fit(points, epochs, lr):
    w = b = 0.0
    n = len(points)
    for epoch in range(1, epochs + 1):
        grad_w = sum(2 * (w * x + b - y) * x for x, y in points) / n
        grad_b = sum(2 * (w * x + b - y) for x, y in points) / n
        w -= lr * grad_w
        b -= lr * grad_b
        if epoch % max(1, epochs // 5) == 0:
            loss = sum((w * x + b - y) ** 2 for x, y in points) / n
            print(f"epoch {epoch:4d}  loss {loss:.6f}")
    return w, b


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()  # trainenv passes every hyperparameter as --name value

    env = training_env()
    points = load_points(env.channel_dirs["train"])
    print(f"training on {len(points)} points with {env.num_cpus} CPUs on {env.current_host}")
    w, b = fit(points, args.epochs, args.lr)
    os.makedirs(env.model_dir, exist_ok=True)
    model_path = os.path.join(env.model_dir, "model.json")
    with open(model_path, "w") as handle:
        json.dump({"w": w, "b": b, "epochs": args.epochs, "lr": args.lr}, handle)
    print(f"model: y = {w:.3f} * x + {b:.3f}, written to {model_path}")


if __name__ == "__main__":
    main()
