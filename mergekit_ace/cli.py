"""The ``mergekit-ace`` command: tools around ACE merges (``mergekit-ace --help``)."""

from __future__ import annotations

import sys

import click
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

# mergekit-yaml options that only shape the written model or its parallel execution; inspect
# writes no model and runs on one device, so they are accepted (the same command line works
# for both tools) but change nothing, and the command says so.
NO_EFFECT_ON_INSPECT = ("out_shard_size", "copy_tokenizer", "clone_tensors", "write_model_card",
                        "safe_serialization", "async_write", "write_threads", "multi_gpu")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Tools for ACE-Merging with mergekit (merge with `mergekit-yaml`, merge_method: ace)."""


@main.command("inspect", cls=PrettyPrintHelp)
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", default="ace-inspect", show_default=True,
              type=click.Path(file_okay=False), help="Directory for the table and the plots.")
@click.option("--estimate-only", is_flag=True,
              help="Read only the safetensors headers: shapes, time and memory, no tensor data.")
@click.option("--no-plots", is_flag=True, help="Write the CSV/JSON table only.")
@click.option("-q", "quiet_short", is_flag=True, help="Same as --quiet: no progress bar.")
@click.option("--flop-rate", type=float, default=None,
              help="Flop/s used for the time estimates (default: measured on the device).")
@add_merge_options
def inspect_command(config_file: str, out_dir: str, estimate_only: bool, no_plots: bool,
                    quiet_short: bool, flop_rate, merge_options: MergeOptions) -> None:
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
    unused = [f"--{name.replace('_', '-')}" for name in NO_EFFECT_ON_INSPECT
              if getattr(merge_options, name) != getattr(defaults, name)]
    if unused:
        click.echo(f"Note: {', '.join(unused)}: no effect on inspect, which writes no model "
                   "and runs on one device.", err=True)
    plots = not no_plots and plots_available()
    try:
        report = inspect_config(config_file, options=merge_options, estimate_only=estimate_only,
                                flop_rate=flop_rate)
    except InspectError as error:
        if merge_options.verbosity > 0:  # -v: the full traceback, for a bug report
            raise
        raise click.ClickException(str(error)) from None
    write_report(report, out_dir, plots=plots)
    click.echo(summary_text(report))
    if plots != (not no_plots):
        click.echo(f"No plots written: {PLOTS_HINT} (or pass --no-plots for the table only).",
                   err=True)


if __name__ == "__main__":
    sys.exit(main())
