"""The ``mergekit-ace`` command: tools around ACE merges (``mergekit-ace --help``)."""

from __future__ import annotations

import sys

import click
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

# mergekit-yaml options that only shape the written model or its parallel execution; inspect
# writes no model and runs on one device, so they are accepted (the same command line works
# for both tools) but change nothing, and the command says so.
NO_EFFECT_ON_INSPECT = (
    "out_shard_size",
    "copy_tokenizer",
    "clone_tensors",
    "write_model_card",
    "safe_serialization",
    "async_write",
    "write_threads",
    "multi_gpu",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Tools for ACE-Merging with mergekit (merge with `mergekit-yaml`, merge_method: ace)."""


@main.command("inspect", cls=PrettyPrintHelp)
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--out",
    "out_dir",
    default="ace-inspect",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory for the table and the plots.",
)
@click.option(
    "--estimate-only",
    is_flag=True,
    help="Read only the safetensors headers: shapes, time and memory, no tensor data.",
)
@click.option("--no-plots", is_flag=True, help="Write the CSV/JSON table only.")
@click.option("-q", "quiet_short", is_flag=True, help="Same as --quiet: no progress bar.")
@click.option(
    "--flop-rate",
    type=float,
    default=None,
    help="Flop/s used for the time estimates (default: measured on the device).",
)
@add_merge_options
def inspect_command(
    config_file: str,
    out_dir: str,
    estimate_only: bool,
    no_plots: bool,
    quiet_short: bool,
    flop_rate,
    merge_options: MergeOptions,
) -> None:
    """Show what ACE will decide for every tensor of the merge in CONFIG_FILE (the YAML that
    `mergekit-yaml` takes), without writing a merged model: per-expert energy, gate statistic and
    branch, k and sigma_iso, the system's condition, spectral concentration before and after
    refinement, and estimated time and memory. Writes inspect.csv, inspect.json and PNG plots
    to --out. Takes mergekit-yaml's options (--cuda, --device, --trust-remote-code,
    --lora-merge-cache, ...)."""
    from mergekit_ace.inspect import InspectError, inspect_config, summary_text, write_report
    from mergekit_ace.inspect.plots import PLOTS_HINT, plots_available

    if quiet_short:
        merge_options = merge_options.model_copy(update={"quiet": True})
    merge_options.apply_global_options()
    defaults = MergeOptions()
    unused = [
        f"--{name.replace('_', '-')}"
        for name in NO_EFFECT_ON_INSPECT
        if getattr(merge_options, name) != getattr(defaults, name)
    ]
    if unused:
        click.echo(
            f"Note: {', '.join(unused)}: no effect on inspect, which writes no model "
            "and runs on one device.",
            err=True,
        )
    plots = not no_plots and plots_available()
    try:
        report = inspect_config(
            config_file, options=merge_options, estimate_only=estimate_only, flop_rate=flop_rate
        )
    except InspectError as error:
        if merge_options.verbosity > 0:  # -v: the full traceback, for a bug report
            raise
        raise click.ClickException(str(error)) from None
    write_report(report, out_dir, plots=plots)
    click.echo(summary_text(report))
    if plots != (not no_plots):
        click.echo(
            f"No plots written: {PLOTS_HINT} (or pass --no-plots for the table only).", err=True
        )


@main.command("check")
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
def check_command(config_file: str) -> None:
    """Check a merge config (for `mergekit-yaml`, or a multi-document `mergekit-multi` recipe)
    for anything mergekit would silently ignore: parameters the merge method does not declare
    (with the nearest valid name), shared parameters written under one model, per-model
    parameters under the base model, misspelled configuration keys, an unknown merge_method.
    Works for every registered method, mergekit's own included. Exits 1 when it finds
    anything, 0 when the config is clean; reads no model."""
    import yaml
    from pydantic import ValidationError

    import mergekit_ace  # noqa: F401  (registers the methods)
    from mergekit_ace.config_check import check_document

    with open(config_file, "r", encoding="utf-8") as fp:
        try:
            documents = [doc for doc in yaml.safe_load_all(fp) if doc is not None]
        except yaml.YAMLError as error:
            raise click.ClickException(f"{config_file} is not valid YAML: {error}") from None
    findings = []
    for index, document in enumerate(documents):
        name = document.get("name") if isinstance(document, dict) else None
        label = ""
        if len(documents) > 1:
            label = f"[{name if name is not None else f'document {index + 1}'}] "
        try:
            findings += check_document(document, label)
        except (ValidationError, ValueError, RuntimeError) as error:
            raise click.ClickException(f"{config_file}: {label}not a valid merge config: {error}")
    for finding in findings:
        click.echo(f"{config_file}: {finding.message}")
    if findings:
        click.echo(f"{len(findings)} finding(s); mergekit would ignore each of them.", err=True)
        sys.exit(1)
    click.echo(f"{config_file}: no ignored parameters or keys.")


if __name__ == "__main__":
    sys.exit(main())
