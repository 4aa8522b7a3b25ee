"""The ``trainenv`` command.

Usage::

    trainenv train                      # the image ENTRYPOINT: run the job under /ml
    trainenv train --dry-run            # print the launch plan, run nothing
    trainenv env --format shell         # the snapshot as `export K='v'` lines (secrets redacted)
    trainenv local --source-dir examples/quickstart --entry-point train.py \\
        --input train=examples/quickstart/data --hp epochs=20
    trainenv serve                      # the serving ENTRYPOINT

``trainenv train`` with no options is what an image's ENTRYPOINT runs on every job start,
so it skips loading click. Every option of ``train`` also has a ``TRAINENV_*`` variable and a
``trainenv.yaml`` key (``trainenv.settings``). Exit statuses: see ``trainenv.outcome``.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Optional, Sequence


def _redacted(value: Any, secrets: Sequence[str], name: str = "") -> Any:
    """A copy with secret-named values masked and known secret values scrubbed from strings."""
    from trainenv.redact import MASK, is_secret_name, redact_text

    if isinstance(value, dict):
        return {k: _redacted(v, secrets, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v, secrets, name) for v in value]
    if name and is_secret_name(name) and value not in (None, ""):
        return MASK
    if isinstance(value, str):
        return redact_text(value, secrets)
    return value


def _shell_lines(variables: dict, secrets: Sequence[str]) -> str:
    """``export NAME='value'`` lines; values redacted before quoting, so every line stays valid."""
    import shlex

    from trainenv.redact import redact_text, redact_value

    return "".join(
        f"export {name}={shlex.quote(redact_text(redact_value(name, value), secrets))}\n"
        for name, value in variables.items()
    )


def build_cli() -> Any:
    import click

    from trainenv import __version__
    from trainenv.errors import ConfigError
    from trainenv.settings import SETTINGS

    def setting_options(function: Any) -> Any:
        for setting in reversed(SETTINGS):
            help_text = f"{setting.help} [env: {setting.variable}]"
            if "/" in setting.flag:
                option = click.option(setting.flag, setting.name, default=None, help=help_text)
            elif setting.choices:
                option = click.option(setting.flag, setting.name, type=click.Choice(setting.choices), default=None, help=help_text)
            else:
                option = click.option(setting.flag, setting.name, default=None, metavar=setting.metavar, help=help_text)
            function = option(function)
        return function

    @click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
    @click.version_option(__version__, prog_name="trainenv")
    def cli() -> None:
        """trainenv: run and serve ML jobs inside a container (PAI /ml layout)."""

    @cli.command()
    @click.option("--dry-run", is_flag=True, help="Print the launch plan (redacted) and run nothing.")
    @setting_options
    def train(dry_run: bool, **flags: Any) -> None:
        """Install requirements, then run the job's entry point under supervision.

        Settings come from these options, then TRAINENV_* variables, then
        input/config/trainenv.yaml (or usercode/trainenv.yaml), then defaults.
        """
        from trainenv.runner import run_training

        sys.exit(run_training(flags, dry_run=dry_run))

    @cli.command("env")
    @click.option("--format", "fmt", type=click.Choice(["json", "yaml", "shell"]), default="json", show_default=True)
    @click.option("--serving", is_flag=True, help="Show the serving snapshot (ServingEnv) instead.")
    def env_command(fmt: str, serving: bool) -> None:
        """Print the job's snapshot; secret-looking values are redacted."""
        from trainenv.environment import serving_env, training_env
        from trainenv.redact import redact_text, secret_values

        try:
            snapshot = serving_env() if serving else training_env()
            if serving:
                secrets = secret_values(os.environ)
            else:
                from trainenv.plan import plan_secrets

                secrets = plan_secrets(snapshot, os.environ)
            if fmt == "shell":
                from trainenv.exports import env_value, normalize, parse_compat

                if serving:
                    variables = {f"TRAINENV_SERVING_{normalize(k)}": env_value(v) for k, v in snapshot.to_dict().items()}
                else:
                    variables = snapshot.to_env_vars(parse_compat(os.environ.get("TRAINENV_COMPAT", "pai")))
                text = _shell_lines(variables, secrets)
            elif fmt == "yaml":
                import yaml

                text = yaml.safe_dump(_redacted(snapshot.to_dict(), secrets), sort_keys=False, allow_unicode=True)
            else:
                import json

                text = json.dumps(_redacted(snapshot.to_dict(), secrets), indent=2, ensure_ascii=False) + "\n"
        except ConfigError as exc:
            click.echo(f"trainenv: ConfigError: {exc}", err=True)
            sys.exit(exc.exit_code)
        click.echo(text, nl=False)

    @cli.command()
    @click.option("--source-dir", type=click.Path(file_okay=False), help="Directory with the job's code (linked as usercode/).")
    @click.option("--entry-point", help="Entry point inside the source dir: train.py, '-m pkg.mod', run.sh, or an executable.")
    @click.option("--command", help="A shell command instead of an entry point.")
    @click.option("--input", "inputs", multiple=True, metavar="CHANNEL=PATH", help="An input channel (linked, not copied); repeatable.")
    @click.option("--hp", "hps", multiple=True, metavar="NAME=VALUE", help="A hyperparameter; repeatable.")
    @click.option("--hps-file", type=click.Path(dir_okay=False), help="A JSON file of hyperparameters (--hp wins).")
    @click.option("--requirements", help="Extra requirement specifiers to install (space separated).")
    @click.option("--job-dir", type=click.Path(file_okay=False), default="trainenv-job", show_default=True, help="Where the job tree is laid out.")
    @click.option("--dry-run", is_flag=True, help="Lay out the job tree, print the launch plan, run nothing.")
    def local(source_dir: Optional[str], entry_point: Optional[str], command: Optional[str], inputs: Sequence[str],
              hps: Sequence[str], hps_file: Optional[str], requirements: Optional[str], job_dir: str, dry_run: bool) -> None:
        """Run a job on this machine, no container needed, with the same launch sequence."""
        from pathlib import Path

        from trainenv.local import hyperparameters_from, lay_out_job, parse_pairs
        from trainenv.runner import run_training

        try:
            layout = lay_out_job(
                Path(job_dir),
                Path(source_dir) if source_dir else None,
                parse_pairs(inputs, "CHANNEL", "--input"),
                hyperparameters_from(hps_file, parse_pairs(hps, "NAME", "--hp")),
            )
        except ConfigError as exc:
            click.echo(f"trainenv: ConfigError: {exc}", err=True)
            sys.exit(exc.exit_code)
        environ = dict(os.environ, TRAINENV_BASE_DIR=str(layout.base_dir))
        flags = {"entry_point": entry_point, "command": command, "requirements": requirements}
        status = run_training(flags, environ, dry_run=dry_run)
        if not dry_run:
            click.echo(f"trainenv: model dir:  {layout.model_dir}", err=True)
            click.echo(f"trainenv: output dir: {layout.output_dir}", err=True)
        sys.exit(status)

    @cli.command()
    def serve() -> None:
        """Load the handler module and serve the model over HTTP (CONTRACT §6)."""
        from trainenv.environment import serving_env
        from trainenv.serving import run_server

        try:
            env = serving_env()
        except ConfigError as exc:
            click.echo(f"trainenv: ConfigError: {exc}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(run_server(env))

    return cli


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["train"]:
        # The ENTRYPOINT path: no options to parse, so no click to import.
        from trainenv.runner import run_training

        sys.exit(run_training({}))
    build_cli()(args=args, prog_name="trainenv")


if __name__ == "__main__":  # pragma: no cover
    main()
