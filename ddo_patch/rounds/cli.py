"""`ddo-patch rounds ...`: run, inspect and report multi-round DDO with a hyperparameter sweep."""

import signal
import sys

import click

from ddo_patch.rounds import manager
from ddo_patch.rounds import report as rounds_report


@click.group()
def rounds():
    """DDO self-play rounds with an alpha x beta sweep, from one TOML file (docs/rounds.md)."""


@rounds.command()
@click.argument('config', metavar='CONFIG')
@click.option('--workdir', metavar='DIR', required=True, help='Where rounds, runs, logs and manifest.json go; rerun to continue.')
@click.option('--no-wait', is_flag=True, help='slurm: submit what can be submitted and return instead of polling.')
@click.option('--retry-failed', is_flag=True, help='Run the failed sweep points of the unfinished round again.')
def run(config, workdir, no_wait, retry_failed):
    """Run the rounds described by CONFIG (TOML); the same command continues after an interruption."""
    # SIGTERM (kill, a scheduler) unwinds like Ctrl-C, so that a running local job is stopped with the manager.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    m = manager.run(config, workdir, wait=not no_wait, retry_failed=retry_failed)
    click.echo('\n'.join(rounds_report.status_lines(workdir)) if m['rounds'] else f'{workdir}: nothing run yet')


@rounds.command()
@click.argument('workdir', metavar='DIR')
def status(workdir):
    """Print where the run in DIR stands: rounds, finished and failed runs, chosen snapshots."""
    click.echo('\n'.join(rounds_report.status_lines(workdir)))


@rounds.command()
@click.argument('workdir', metavar='DIR')
def report(workdir):
    """Print the per-round table and the flagged runs, and write DIR/report.md, DIR/report.png (metric and cost per
    round) and DIR/report-diagnostics-roundNN.png (each run's DDO terms next to its evaluations)."""
    text, pngs = rounds_report.report(workdir)
    click.echo(text + '\nplots: ' + ', '.join(pngs))
