"""What a command under ``OCI__LAUNCH_CMD`` finds in its environment."""

import os
import sys

names = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
print(" ".join(f"{name}={os.environ.get(name)}" for name in names), "argv", sys.argv[1:])
