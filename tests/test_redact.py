"""Secrets: one rule for names, every quoting of a value, and the real commands end to end.

The rule (``trainenv.redact``): a name is secret when it contains secret/password/passwd, or
when its last word is token, key, apikey, pwd, credential(s), auth or passphrase. A secret's
value never shows in ``env``, ``train --dry-run``, the log or the failure file, in any quoting.
"""

from __future__ import annotations

import json
import shlex

import pytest

from support import failure, make_tree, run_train
from trainenv.redact import MASK, is_secret_name, redact_data, redact_text, secret_values

SECRET_NAMES = [
    "HF_TOKEN", "wandbApiKey", "db_password", "DB_PASSWD", "client_secret", "SecretThing", "api_key", "MyAPIKey",
    "ssh_pwd", "aws_credentials", "google-credential", "x.auth", "gpg_passphrase", "Auth-Token", "token", "KEY",
]
PLAIN_NAMES = [
    "tokenizer", "max_tokens", "key_dim", "monkey_patch", "author", "auth_header", "API_KEY_2", "keyboard",
    "token_count", "HFToken", "passage", "lr", "", "PWD", "OLDPWD",
]


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_secret_names(name):
    assert is_secret_name(name)


@pytest.mark.parametrize("name", PLAIN_NAMES)
def test_names_that_are_not_secret(name):
    assert not is_secret_name(name)


# Both quotes, a backslash, a newline and a non-ASCII letter: every quoting escapes something.
AWKWARD = 'S3cr"et\\pa\'ss\nwörd'


def serialized(value: str) -> list:
    """The forms a value takes in trainenv's output and in error messages."""
    return [
        value,
        json.dumps(value),
        json.dumps(value, ensure_ascii=False),
        json.dumps({"k": [value]}),
        shlex.quote(value),
        "export X=" + shlex.quote(value),
        repr(value),
        repr([value]),
        repr({"k": value}),
        ascii(value),
        f"TRAINENV_GRACE_SECONDS: {value!r}: expected a number",
        repr("it's \"quoted\": " + value),
        repr("a single ' quote: " + value),
        repr("no quote: " + value),
    ]


SECRETS = [AWKWARD, AWKWARD.replace('"', ""), AWKWARD.replace("'", "")]  # each quote alone changes repr's choice


@pytest.mark.parametrize("secret, text", [(secret, text) for secret in SECRETS for text in serialized(secret)])
def test_a_secret_is_scrubbed_in_every_quoting(secret, text):
    scrubbed = redact_text(text, secret_values({"DB_PASSWORD": secret}))
    assert "S3cr" not in scrubbed and "rd" not in scrubbed.replace(" quote", "")
    assert MASK in scrubbed


def test_redact_data_masks_by_name_at_any_depth_and_scrubs_the_rest():
    secrets = secret_values({"HF_TOKEN": "tok-123456"})
    data = {"hps": {"wandbApiKey": "abc", "cfg": {"db_password": 7}, "note": "uses tok-123456"}, "tokenizer": "bert", "url": "https://u:p@h/x"}
    assert redact_data(data, secrets) == {
        "hps": {"wandbApiKey": MASK, "cfg": {"db_password": MASK}, "note": f"uses {MASK}"},
        "tokenizer": "bert",
        "url": f"https://{MASK}@h/x",
    }


def launcher_lines(stderr: str) -> str:
    return "\n".join(line for line in stderr.splitlines() if line.startswith("trainenv:"))


def test_a_bad_setting_carrying_a_secret_never_reaches_the_failure_file(tmp_path):
    """The error shows the bad value as Python's repr: the secret's repr form is scrubbed too."""
    base = make_tree(tmp_path, {"train.py": ""})
    done = run_train(base, text=True, TRAINENV_ENTRY_POINT="train.py", HF_TOKEN=AWKWARD, TRAINENV_GRACE_SECONDS=AWKWARD)
    assert done.returncode == 78
    text = failure(base)
    assert text.startswith("ConfigError: TRAINENV_GRACE_SECONDS: '***': expected a number"), text
    assert "S3cr" not in text and "S3cr" not in launcher_lines(done.stderr)


def test_a_long_secret_cut_short_in_an_error_is_still_scrubbed(tmp_path):
    """Error messages cut long values at 80 characters: the part of the secret that shows goes too."""
    secret = "hf_" + "Zq9" * 40
    base = make_tree(tmp_path, {"train.py": ""})
    done = run_train(base, text=True, TRAINENV_ENTRY_POINT="train.py", HF_TOKEN=secret, TRAINENV_GRACE_SECONDS=secret)
    assert done.returncode == 78
    text = failure(base)
    assert text.startswith("ConfigError: TRAINENV_GRACE_SECONDS: '***...: expected a number"), text
    assert "Zq9Zq9" not in text and "Zq9Zq9" not in done.stderr


def test_everything_below_a_secret_name_is_masked():
    data = {"credentials": {"user": "alice", "pass": ["p1", "p2"]}, "lr": 0.1, "PWD": "/work/job"}
    assert redact_data(data) == {"credentials": {"user": MASK, "pass": [MASK, MASK]}, "lr": 0.1, "PWD": "/work/job"}


def test_the_working_directory_is_not_scrubbed_from_logs():
    assert secret_values({"PWD": "/work/job", "OLDPWD": "/work"}) == []


def test_a_secret_hyperparameter_in_a_traceback_never_reaches_the_failure_file(tmp_path):
    script = "import sys\nraise ValueError(f'bad arguments: {sys.argv[1:]!r}')\n"
    base = make_tree(tmp_path, {"train.py": script}, {"db_password": AWKWARD, "lr": 0.1})
    done = run_train(base, text=True, TRAINENV_ENTRY_POINT="train.py")
    assert done.returncode == 1
    text = failure(base)
    assert "ValueError: bad arguments: ['--db_password', '***', '--lr', '0.1']" in text, text
    assert "S3cr" not in text and "S3cr" not in launcher_lines(done.stderr)


def test_dry_run_hides_secrets_unless_asked(tmp_path):
    base = make_tree(tmp_path, {"train.py": ""}, {"hf_token": AWKWARD, "lr": 0.1})
    done = run_train(base, "--dry-run", text=True, TRAINENV_ENTRY_POINT="train.py")
    assert done.returncode == 0, done.stderr
    assert "S3cr" not in done.stdout
    assert "  # TRAINENV_HP_HF_TOKEN: secret, not shown (--show-secrets shows it)" in done.stdout.splitlines()
    assert "  # TRAINENV_HPS: holds a secret, not shown (--show-secrets shows it)" in done.stdout.splitlines()
    assert '"--hf_token", "***"' in done.stdout
    shown = run_train(base, "--dry-run", "--show-secrets", text=True, TRAINENV_ENTRY_POINT="train.py")
    assert shown.returncode == 0, shown.stderr
    assert json.dumps(AWKWARD, ensure_ascii=False) in shown.stdout


def test_literal_and_short_numeric_secret_values_are_masked_by_name_but_not_scrubbed_from_text():
    """``{"use_auth": "true"}`` must not turn every ``true`` of a traceback into ``***``."""
    secrets = secret_values({"use_auth": "true", "db_port_key": "5432", "pin_password": "12345678"})
    assert "true" not in secrets and "5432" not in secrets and "12345678" in secrets
    assert redact_text("ValueError: construct is true on port 5432", secrets) == "ValueError: construct is true on port 5432"
    assert redact_data({"use_auth": "true"}, secrets) == {"use_auth": MASK}


def test_url_credentials_never_survive_a_cut_short_value(tmp_path):
    """``errors.shown`` cuts long values: the ``user:token@`` part must be gone before the cut."""
    from trainenv.errors import shown

    value = 'torch "mylib @ git+https://ci-bot:ghp_0123456789abcdefghijklmnopqrstuvwxyzABCDEF@github.com/org/mylib"'
    assert "ghp_" not in shown(value) and "ci-bot" not in shown(value)


def test_a_secret_cut_by_fitting_the_failure_file_is_still_scrubbed():
    from trainenv.outcome import FAILURE_FILE_LIMIT, Outcome, failure_text

    token = "hf_ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    filler = "x" * 100 + "\n"
    for shift in range(0, len(token), 7):  # the cut falls at every place inside the token
        tail = "Traceback (most recent call last):\n" + token + "\n" + filler * ((FAILURE_FILE_LIMIT // 101) - 1) + "y" * shift
        text = failure_text(Outcome(1, "UserError", "job failed", tail), secret_values({"HF_TOKEN": token}))
        assert "0123456789" not in text and len(text) <= FAILURE_FILE_LIMIT
