"""`ddo-patch apply | check | revert --repo DIR`: the patch files under patches/ on an upstream checkout."""

import warnings

import click

from ddo_patch import patching, upstream

repo_option = click.option('--repo', metavar='DIR', required=True, type=click.Path(file_okay=False),
                           help='The EDM2 or VAR checkout (a git clone or a plain copy).')
only_option = click.option('--only', metavar='NAME', multiple=True,
                           help='Only this patch (repeatable; the name without its number).  [default: all]')

# How each command words the per-patch states of patching.Report.
WORDS = {
    'apply': {patching.APPLIED: 'already applied', patching.APPLICABLE: 'applied'},
    'check': {patching.APPLIED: 'applied', patching.APPLICABLE: 'would apply'},
    'revert': {patching.APPLIED: 'reverted', patching.APPLICABLE: 'not applied'},
}


def _run(command, repo, only):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always', upstream.UpstreamCommitWarning)
        report = getattr(patching, command)(repo, only)
    for warning in caught:
        click.echo(f'warning: {warning.message}', err=True)
    commit = report.commit[:12] if report.commit else 'unknown commit'
    click.echo(f'{report.upstream} checkout {report.root} at {commit}{" (pinned)" if report.pinned else ""}')
    for name, state in report.states.items():
        word, _, reason = state.partition(': ')
        click.echo(f'  {WORDS[command].get(word, word):<16}{name}' + (f'  ({reason})' if reason else ''))
    return report


@click.command()
@repo_option
@only_option
def apply(repo, only):
    """Apply the patches to an upstream checkout: all or nothing; patches already applied are skipped."""
    _run('apply', repo, only)


@click.command()
@repo_option
@only_option
def check(repo, only):
    """Say which patches are applied, would apply, or conflict; change nothing (exit 1 on a conflict)."""
    report = _run('check', repo, only)
    if any(state.startswith(patching.CONFLICT) for state in report.states.values()):
        raise click.exceptions.Exit(1)


@click.command()
@repo_option
@only_option
def revert(repo, only):
    """Reverse the applied patches, restoring the patched files byte for byte: all or nothing."""
    _run('revert', repo, only)


COMMANDS = (apply, check, revert)
