"""The ``mergekit-ace`` command: tools around ACE merges (``mergekit-ace --help``)."""

from __future__ import annotations

import sys

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Tools for ACE-Merging with mergekit (merge with `mergekit-yaml`, merge_method: ace)."""


@main.command("inspect")
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", default="ace-inspect", show_default=True,
              type=click.Path(file_okay=False), help="Directory for the table and the plots.")
@click.option("--cuda", is_flag=True, help="Run the ACE kernel on the GPU.")
@click.option("--estimate-only", is_flag=True,
              help="Read only the safetensors headers: shapes, time and memory, no tensor data.")
@click.option("--no-plots", is_flag=True, help="Write the CSV/JSON table only.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--flop-rate", type=float, default=None,
              help="Flop/s used for the time estimates (default: measured on the device).")
def inspect_command(config_file: str, out_dir: str, cuda: bool, estimate_only: bool,
                    no_plots: bool, quiet: bool, flop_rate) -> None:
    """Show what ACE will decide for every tensor of the merge in CONFIG_FILE (the YAML that
    `mergekit-yaml` takes), without writing a merged model: per-expert energy, gate statistic and
    branch, k and sigma_iso, the system's condition, spectral concentration before and after
    refinement, and estimated time and memory. Writes inspect.csv, inspect.json and PNG plots
    to --out."""
    from mergekit_ace.inspect import InspectError, inspect_config, summary_text, write_report

    plots = not no_plots
    if plots:
        from mergekit_ace.inspect_plots import MissingPlotDependency, require_matplotlib

        try:
            require_matplotlib()
        except MissingPlotDependency as error:
            raise click.ClickException(str(error)) from None
    try:
        report = inspect_config(config_file, device="cuda" if cuda else "cpu",
                                estimate_only=estimate_only, quiet=quiet, flop_rate=flop_rate)
    except InspectError as error:
        raise click.ClickException(str(error)) from None
    write_report(report, out_dir, plots=plots)
    click.echo(summary_text(report))


if __name__ == "__main__":
    sys.exit(main())
