"""The ``trainenv`` command.

Usage::

    trainenv train                      # the image ENTRYPOINT: run the job under /ml
    trainenv train --dry-run            # print the launch plan, run nothing
    trainenv env --format shell         # the plan's variables as `export K='v'` lines (no secrets)
    trainenv local --source-dir examples/quickstart --entry-point train.py \\
        --input train=examples/quickstart/data --hp epochs=20
    trainenv local --image localhost/trainenv:cpu --source-dir examples/quickstart \\
        --entry-point train.py --input train=examples/quickstart/data --nodes 2
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
    from typing import Any, Sequence


def build_cli() -> Any:
    import click

    from trainenv import __version__
    from trainenv.errors import ConfigError
    from trainenv.settings import SETTINGS

    def setting_options(function: Any) -> Any:
        for setting in reversed(SETTINGS):
            if not setting.flag:
                continue  # a variable-only setting
            help_text = f"{setting.help} [env: {setting.variable}]"
            if "/" in setting.flag:
                option = click.option(setting.flag, setting.name, default=None, help=help_text)
            elif setting.choices:  # checked by resolve_settings, so a bad value is a ConfigError (78) like its variable's
                option = click.option(setting.flag, setting.name, default=None, metavar=f"[{'|'.join(setting.choices)}]", help=help_text)
            else:
                option = click.option(setting.flag, setting.name, default=None, metavar=setting.metavar, help=help_text)
            function = option(function)
        return function

    @click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
    @click.version_option(__version__, prog_name="trainenv")
    def cli() -> None:
        """trainenv: run and serve ML jobs inside a container (PAI /ml layout)."""

    show_secrets_option = click.option(
        "--show-secrets", is_flag=True, help="Print the values of secrets too (by default they are left out or shown as ***)."
    )

    # The job's own arguments: ``trainenv train -- ARGS`` (after the hyperparameter arguments;
    # an entry function's arguments by ADS's rules, trainenv.runtimes.function).
    job_args_argument = click.argument("job_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- ARGS]")

    @cli.command()
    @click.option("--dry-run", is_flag=True, help="Print the launch plan (secrets redacted) and run nothing.")
    @show_secrets_option
    @setting_options
    @job_args_argument
    def train(dry_run: bool, show_secrets: bool, **flags: Any) -> None:
        """Install requirements, then run the job's entry point under supervision.

        Settings come from these options, then TRAINENV_* variables, then
        input/config/trainenv.yaml (or usercode/trainenv.yaml), then defaults.
        ARGS after -- are the job's own arguments (a container's CMD): passed to the
        entry point after the hyperparameter arguments. An entry function gets them
        instead of the hyperparameters, by ADS's rules (--k v is k="v", a bare --k is
        None, the rest positional).
        """
        from trainenv.runner import run_training

        sys.exit(run_training(dict(flags, show_secrets=show_secrets), dry_run=dry_run))

    @cli.command("env")
    @click.option("--format", "fmt", type=click.Choice(["json", "yaml", "shell"]), default="json", show_default=True)
    @click.option("--serving", is_flag=True, help="Show the serving snapshot (ServingEnv) instead.")
    @show_secrets_option
    @setting_options
    def env_command(fmt: str, serving: bool, show_secrets: bool, **flags: Any) -> None:
        """Print the job's snapshot and launch plan; creates, changes and removes nothing.

        json and yaml: the snapshot, and under "launch" the plan `train --dry-run` prints (argv,
        the variables trainenv sets, each setting with where it came from). shell: those
        variables as `export NAME='value'` lines. Takes the same options as `train`. Secret
        values are shown as *** (json, yaml) or left out with a comment line (shell).
        """
        from trainenv.exports import shell_lines
        from trainenv.redact import redact_data, redact_text, secret_values

        secrets = secret_values(os.environ)
        try:
            if serving:
                from trainenv.environment import serving_env
                from trainenv.settings.serving import serving_variables

                serving_snapshot = serving_env()
                variables = serving_variables(serving_snapshot) if fmt == "shell" else None
                data = serving_snapshot.to_dict()
            else:
                from trainenv.plan import read_plan

                snapshot, plan = read_plan(flags, os.environ)
                secrets = list(plan.secrets)
                variables = plan.environment() if fmt == "shell" else None
                data = dict(snapshot.to_dict(), launch=plan.view(show_secrets=True))
            if variables is not None:
                text = shell_lines(variables, secrets, show_secrets)
            else:
                data = data if show_secrets else redact_data(data, secrets)
                if fmt == "yaml":
                    import yaml

                    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
                else:
                    import json

                    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        except ConfigError as exc:
            click.echo(f"trainenv: ConfigError: {redact_text(str(exc), secrets)}", err=True)
            sys.exit(exc.exit_code)
        click.echo(text, nl=False)

    @cli.command()
    @click.option("--source-dir", type=click.Path(file_okay=False), help="Directory with the job's code (copied to usercode/; never written to).")
    @click.option("--input", "inputs", multiple=True, metavar="CHANNEL=PATH", help="An input channel (linked, not copied); repeatable.")
    @click.option("--hp", "hps", multiple=True, metavar="NAME=VALUE", help="A hyperparameter; repeatable.")
    @click.option("--hps-file", type=click.Path(dir_okay=False), help="A JSON file of hyperparameters (--hp wins).")
    @click.option("--job-dir", type=click.Path(file_okay=False),
                  help="A new or empty dir to lay the job out in [default: a fresh ./trainenv-jobs/<UTC time>-<pid>].")
    @click.option("--env", "env_pairs", multiple=True, metavar="NAME=VALUE", help="A variable for the job; repeatable.")
    @click.option("--image", metavar="IMAGE",
                  help="Run the job in this image with docker or podman (the first that answers; "
                       "TRAINENV_CONTAINER_ENGINE to choose), the job dir mounted at /ml.")
    @click.option("--nodes", metavar="N", help="With --image: run N nodes, one container each (hosts algo-1..N).")
    @click.option("--network", "network_mode", metavar="[bridge|shared|loopback]",
                  help="With --image: bridge (default: a network of the run's own when N > 1), shared "
                       "(all nodes in one network namespace, algo-1..N on 127.0.0.1) or loopback "
                       "(shared, with no outside network).")
    @click.option("--gpus", metavar="all|N", help="With --image: pass all GPUs, or N to each node.")
    @click.option("--dry-run", is_flag=True,
                  help="Lay out the job tree, print the launch plan (with --image: the engine command lines), run nothing.")
    @setting_options
    @job_args_argument
    def local(source_dir: str | None, inputs: Sequence[str], hps: Sequence[str], hps_file: str | None,
              job_dir: str | None, env_pairs: Sequence[str], image: str | None, nodes: str | None,
              network_mode: str | None, gpus: str | None, dry_run: bool, **flags: Any) -> None:
        """Run a job on this machine, as a platform would: in-process, or in an image (--image).

        Each run gets a job dir of its own (its path is printed): two runs never share a file;
        the job runs in a copy of the source dir, which is never written to. Every option of
        `trainenv train` works here too, and reaches the container with --image (as its
        TRAINENV_* variable), as does every --env. With --image, the output dir is kept on the
        host, and Ctrl-C or SIGTERM stops and removes every container and network of the run.
        """
        from pathlib import Path

        from trainenv.local.job import check_inputs, hyperparameters_from, lay_out_job, parse_pairs, run_job

        say = lambda line: click.echo(f"trainenv: {line}", err=True)  # noqa: E731
        try:
            env = parse_pairs(env_pairs, "NAME", "--env")
            input_pairs = parse_pairs(inputs, "CHANNEL", "--input")
            hyperparameters = hyperparameters_from(hps_file, parse_pairs(hps, "NAME", "--hp"))
            if image is None:
                for name, given in (("--nodes", nodes), ("--network", network_mode), ("--gpus", gpus)):
                    if given is not None:
                        raise ConfigError.at(name, None, f"{given!r}: needs --image")
            else:
                from trainenv.local.containers import check_image
                from trainenv.local.image import check_options

                options = check_options(nodes, network_mode, gpus)
                check_inputs(input_pairs)  # before the engine is asked anything
                engine, has_entrypoint = check_image(image, os.environ, dry_run, say)
            layout = lay_out_job(
                Path(job_dir) if job_dir else None,
                Path(source_dir) if source_dir else None,
                input_pairs,
                hyperparameters,
            )
            if image is not None:
                from trainenv.local.containers import run_image_job

                job_args = flags.pop("job_args", ())
                options.update(flags=flags, env=env, job_args=job_args)
                sys.exit(run_image_job(engine, layout, image, has_entrypoint, options, dry_run, say))
        except ConfigError as exc:
            from trainenv.redact import redact_text

            click.echo(f"trainenv: ConfigError: {redact_text(str(exc))}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(run_job(layout, flags, dry_run, environ=dict(os.environ, **dict(env)), say=say))

    def serving_options(function: Any) -> Any:
        from trainenv.settings.serving import SERVING

        for setting in reversed([s for s in SERVING if s.flag]):
            names = " then ".join((setting.variable, *setting.fallbacks))
            default = "" if setting.default is None else f" Default: {setting.default}."
            help_text = f"{setting.help}{default} [env: {names}]"
            # Choices are checked with the variables' rules, so a bad value exits 78 naming the option.
            metavar = f"[{'|'.join(setting.choices)}]" if setting.choices else setting.metavar
            function = click.option(setting.flag, setting.name, default=None, metavar=metavar, help=help_text)(function)
        return function

    @cli.command()
    @serving_options
    def serve(**flags: Any) -> None:
        """Load the handler module and serve the model over HTTP.

        The handler is inference.py in <model dir>/code, else in the code dir (or
        TRAINENV_SERVING_MODULE), with SageMaker's hooks: model_fn(model_dir),
        input_fn(body, content_type), predict_fn(data, model), output_fn(prediction, accept),
        or transform_fn. Routes: GET /ping (200 once the model is loaded), POST /invocations,
        the KServe v2 routes under /v2, and Vertex AI's AIP_HEALTH_ROUTE / AIP_PREDICT_ROUTE.
        Each option overrides its variable; `trainenv env --serving` prints every setting.
        SIGTERM lets requests in flight finish, then exits 0; a bad setting exits 78.
        """
        from trainenv.serving.startup import main as serve_main

        sys.exit(serve_main(flags))

    return cli


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["train"]:
        # The ENTRYPOINT path: no options to parse, so no click to import.
        from trainenv.runner import run_training

        code = run_training({})
        if argv is None:  # this is the whole process: end it without the interpreter's tear-down
            _exit_now(code)
        sys.exit(code)
    build_cli()(args=args, prog_name="trainenv")


def _exit_now(code: int) -> None:
    """Flush our output and exit at once: the job is over and reaped, every file we wrote is
    closed, and nothing of ours is left for ``atexit`` or the interpreter's tear-down (which
    costs ~3 ms of every launch)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a reader that went away: nothing left to tell it
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
