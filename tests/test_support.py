"""The shared helpers themselves: a job started by a test sees only what the test gave it."""

from __future__ import annotations

import json

from support import make_tree, run_train

SHOW_ENVIRON = "import json, os\nprint(json.dumps(sorted(os.environ)))\n"

# What a CI machine, a platform or an earlier test may have in the environment of pytest itself.
INHERITED = {
    "SAGEMAKER_PROGRAM": "evil.py",
    "TF_CONFIG": '{"cluster": {"worker": ["h:1"]}, "task": {"type": "worker", "index": 0}}',
    "MASTER_ADDR": "10.9.9.9",
    "AIP_MODEL_DIR": "/nowhere",
    "OMPI_COMM_WORLD_RANK": "3",
    "HF_TOKEN": "hf_inherited_secret_value",
}


def test_a_job_run_by_the_helpers_does_not_inherit_platform_or_secret_names(tmp_path, monkeypatch):
    for name, value in INHERITED.items():
        monkeypatch.setenv(name, value)
    base = make_tree(tmp_path, {"train.py": SHOW_ENVIRON})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py", KEPT="1")
    assert done.returncode == 0, done.stderr.decode()
    seen = set(json.loads(done.stdout))
    assert "KEPT" in seen
    assert not seen & set(INHERITED), sorted(seen & set(INHERITED))
