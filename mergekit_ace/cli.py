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


# Exit statuses of `mergekit-ace check`.
CLEAN, FINDINGS, INVALID = 0, 1, 2


@main.command("check")
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
def check_command(config_file: str) -> None:
    """Check a merge config (for `mergekit-yaml`, or a multi-document `mergekit-multi` recipe)
    as the merge will read it, without merging: what mergekit would silently ignore or
    rewrite (misspelled keys, also in `tokenizer:` and filter entries; parameters the method
    does not declare, with the nearest valid name; shared parameters under one model;
    per-model parameters under the base; filter entries that never apply; residual_weight)
    and what would stop it (invalid values, an unknown merge_method, a duplicate model, a
    slice without the base, a mergekit-moe config). When every model is a local directory,
    the merge is also planned from the config.json files and safetensors headers (no
    tensor is read): filters that match no tensor, a dtype coarser than the checkpoints,
    experts of another shape. Works for every registered method, mergekit's own included.
    Exit status: 0 clean, 1 findings, 2 a config mergekit would refuse or that cannot be
    read."""
    import yaml

    import mergekit_ace  # noqa: F401  (registers the methods)
    from mergekit_ace.checks import check_source
    from mergekit_ace.checks.planned import check_planned, plannable

    try:
        with open(config_file, "r", encoding="utf-8") as fp:
            documents = check_source(fp.read())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        click.echo(f"{config_file}: not valid YAML: {error}", err=True)
        sys.exit(INVALID)
    findings, unplanned = [], []
    for document in documents:
        findings += document.findings
        if document.config is None or any(f.error for f in document.findings):
            continue
        if plannable(document.config):
            findings += [f.labelled(document.label) for f in check_planned(document.config)]
        else:
            unplanned.append(document.label.strip() or config_file)
    for finding in findings:
        click.echo(f"{config_file}: {'error: ' if finding.error else ''}{finding.message}")
    if unplanned:
        click.echo(
            f"Not planned ({', '.join(unplanned)}): some models are not local directories, so "
            "two checks were skipped: filters that match no tensor, and `dtype:` against the "
            "checkpoints' precision.",
            err=True,
        )
    errors = sum(f.error for f in findings)
    if errors:
        click.echo(
            f"{errors} error(s): mergekit would stop on these; {len(findings) - errors} "
            "other finding(s).",
            err=True,
        )
        sys.exit(INVALID)
    if findings:
        click.echo(
            f"{len(findings)} finding(s): mergekit would merge without a word, ignoring or "
            "changing what is written.",
            err=True,
        )
        sys.exit(FINDINGS)
    click.echo(f"{config_file}: no findings.")


if __name__ == "__main__":
    sys.exit(main())
