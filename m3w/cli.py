"""The `m3w` command line: one group, one subcommand per stage, one error path, one set of shared options.

Subcommands are imported only when run, so `m3w --help` is fast and a stage's heavy imports (torch, ray) load
only for the stage that needs them.

Errors: input the user can fix (a `UserError`, a click usage error, an OS error on a path) is printed as one line,
`m3w <command>: error: <what>`, with exit status 2 and no traceback; `m3w --debug ...` (or M3W_DEBUG=1) shows
the traceback too. Anything else is a bug and keeps its traceback. Stage commands take their config through
`stage_options`, which loads and checks it before the command starts any work (no Ray for a typo).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from m3w import __version__
from m3w.config import CONFIG_CLASSES
from m3w.errors import UserError

# name → ("module:attribute" of a click command or group, one-line help shown by `m3w --help`)
COMMANDS = {
    "extract": ("m3w.pipeline.extract:extract_cmd", "WARC files → documents/ (interleaved text and images)."),
    "docs": ("m3w.pipeline.docs:docs_group", "Look at documents: `m3w docs to-jsonl PATH`."),
    "filter": (
        "m3w.pipeline.filter:filter_cmd",
        "documents/ → filtered/ + excluded/ (quality filters, dedup).",
    ),
    "stats": ("m3w.pipeline.stats:stats_cmd", "Funnel table and chart from stage manifests."),
    "images": (
        "m3w.pipeline.images:images_cmd",
        "Fetch, validate and resize images into the content-addressed store.",
    ),
    "store": (
        "m3w.pipeline.store_cli:store_group",
        "Image store upkeep: `m3w store info|compact|vacuum|migrate STORE`.",
    ),
    "tokenizer": ("m3w.pipeline.tokenizer_cli:tokenizer_group", "Train the default tokenizer."),
    "shards": (
        "m3w.pipeline.shards:shards_group",
        "filtered/ + images/ → WebDataset shards (M3W windows, pairs, video).",
    ),
    "interop": (
        "m3w.pipeline.interop:interop_group",
        "Import OBELICS/MMC4 documents; export to Hugging Face datasets.",
    ),
    "inspect": (
        "m3w.pipeline.inspect:inspect_cmd",
        "Render shards or documents as a self-contained HTML page.",
    ),
    "build": ("m3w.pipeline.build:build_cmd", "Run every stage in order from one YAML config."),
    "config": ("m3w.cli:config_group", "Print a stage's resolved config: `m3w config show filter`."),
    "model": ("m3w.model.cli:model_group", "Model utilities: `m3w model info`."),
    "train": ("m3w.trainer.cli:train_cmd", "Train the Flamingo model on mixed shard streams."),
    "eval": ("m3w.trainer.evaluate:eval_cmd", "Few-shot evaluation: captioning, VQA, classification."),
}

# The shipped YAML files that `m3w config show STAGE` generates from the defaults (tests/test_config.py checks).
DEFAULTS_FILES = {"filter": "filters.yaml", "images": "images.yaml", "shards": "shards.yaml"}


def _import(target: str) -> Any:
    module_name, attr = target.split(":")
    return getattr(importlib.import_module(module_name), attr)


# ------------------------------------------------------------------------------------------- the error path


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _user_message(exc: BaseException) -> str | None:
    """The one line to print for an error the user can fix; None for a bug."""
    if isinstance(exc, click.ClickException):
        return exc.format_message()
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, OSError):  # a path that is missing, unreadable or unwritable, a host that is down
        if exc.filename is not None and exc.strerror:
            return f"{exc.strerror}: {exc.filename}"
        return str(exc) or type(exc).__name__
    return None


class LazyGroup(click.Group):
    """Subcommands imported on first use; their one-line help comes from COMMANDS."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return _import(COMMANDS[cmd_name][0]) if cmd_name in COMMANDS else None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][1]) for name in self.list_commands(ctx)])

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: ANN001
        """Click's main with m3w's error path: user errors as one line and exit status 2."""
        argv = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in argv or os.environ.get("M3W_DEBUG", "") not in ("", "0")
        command = next((a for a in argv if a in COMMANDS), None)
        where = f"m3w {command}" if command else "m3w"
        try:
            result = super().main(argv, prog_name or "m3w", complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("m3w: aborted", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - sorted into user errors (one line) and bugs (traceback)
            message = _user_message(exc)
            if message is None:
                raise
            if debug:
                traceback.print_exc()
            click.echo(f"{where}: error: {_one_line(message)}", err=True)
            sys.exit(2)
        if standalone_mode:
            sys.exit(result if isinstance(result, int) else 0)
        return result


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="m3w")
@click.option("--debug", is_flag=True, help="Show the traceback of an error (also: M3W_DEBUG=1).")
def main(debug: bool) -> None:
    """m3w: build M3W-style interleaved image-text corpora and train Flamingo-style models on them."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---------------------------------------------------------------------------------------- shared options


class OutputDir(click.ParamType):
    """A directory the command will write into: created if missing, and checked writable before any work."""

    name = "DIR"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from m3w.pipeline.io import is_remote

        text = os.fspath(value)
        if is_remote(text):  # object storage: nothing to create up front
            return text
        path = Path(text)
        if path.exists() and not path.is_dir():
            self.fail(f"{text} exists and is not a directory", param, ctx)
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path, prefix=".m3w-write-check-"):
                pass
        except OSError as exc:
            self.fail(f"cannot write to {text}: {exc.strerror or exc}", param, ctx)
        return text


def ray_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`--workers N` and `--ray-address ADDR`, for every command that runs on Ray."""
    fn = click.option(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="Ray cluster to run on (default: RAY_ADDRESS, else a private local Ray).",
    )(fn)
    return click.option(
        "--workers",
        type=click.IntRange(min=1),
        default=None,
        help="Ray tasks in flight (default: every CPU of the Ray cluster).",
    )(fn)


def stage_options(
    config_cls: type | None = None,
    *,
    config_argument: bool = False,
    ray: bool = True,
    set_help: str = "Override one config value, e.g. paragraph.min_words=5 (repeatable; values are YAML).",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The options every stage command shares: `--config FILE` (or a CONFIG argument), `--set KEY=VALUE`,
    and with `ray` also `--workers N` and `--ray-address ADDR`.

    With `config_cls`, the command receives `config`: the dataclass loaded from defaults ← file ← `--set`, with
    every key and type checked here, before the command body runs. Without it, it receives `config_path` and
    `overrides` as given."""
    from m3w.config import load_config

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, config_path: str | None, overrides: tuple[str, ...], **kwargs: Any) -> Any:
            if config_cls is None:
                return fn(*args, config_path=config_path, overrides=overrides, **kwargs)
            return fn(*args, config=load_config(config_cls, config_path, overrides), **kwargs)

        decorated = ray_options(wrapper) if ray else wrapper
        decorated = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=set_help)(
            decorated
        )
        if config_argument:
            return click.argument(
                "config_path", metavar="CONFIG", type=click.Path(exists=True, dir_okay=False)
            )(decorated)
        name = config_cls.__name__ if config_cls is not None else "the"
        return click.option(
            "--config",
            "config_path",
            type=click.Path(exists=True, dir_okay=False),
            metavar="FILE",
            help=f"YAML file of {name} settings (every key optional; `m3w config show` lists them).",
        )(decorated)

    return decorate


# ------------------------------------------------------------------------------------------- m3w config


@click.group("config")
def config_group() -> None:
    """Stage configs: every key, its resolved value and what it means."""


@config_group.command("show")
@click.argument("stage", type=click.Choice(sorted(CONFIG_CLASSES)))
@stage_options(ray=False)
def config_show_cmd(stage: str, config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Print STAGE's config after defaults ← --config FILE ← --set, as YAML with each key's comment."""
    from m3w.config import config_class, load_config, to_yaml

    config = load_config(config_class(stage), config_path, overrides)
    click.echo(to_yaml(config, header=defaults_header(stage)), nl=False)


def defaults_header(stage: str) -> str:
    module = CONFIG_CLASSES[stage].split(":")[0]
    return (
        f"`m3w {stage}` settings, generated by `m3w config show {stage}` from the dataclasses in {module}\n"
        "(where the defaults live). Copy and edit: every key is optional, a missing key keeps its default."
    )
