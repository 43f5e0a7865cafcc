"""The `ddo-patch` command line."""

import os

import click

from ddo_patch import patch_cli, upstream
from ddo_patch.rounds import cli as rounds_cli
from ddo_patch.errors import DDOPatchError, EXIT_USER_ERROR


class _Group(click.Group):
    """Turn a DDOPatchError anywhere below into one line on stderr and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DDOPatchError as err:
            click.echo(f'error: {err}', err=True)
            ctx.exit(EXIT_USER_ERROR)


@click.group(cls=_Group, context_settings=dict(help_option_names=['-h', '--help'], max_content_width=100))
@click.version_option(package_name='ddo-patch')
def main():
    """DDO finetuning for EDM2 and VAR: the toy demo, upstream checkouts, multi-round self-play, patches."""


@main.command()
@click.argument('name', type=click.Choice(sorted(upstream.UPSTREAMS)))
@click.option('--from', 'source', metavar='URL|PATH', default=None,
              help='Clone from here instead of GitHub (a mirror, a local clone, a bare git directory).')
@click.option('--dest', metavar='DIR', default=None, help='Where to put the checkout.  [default: the cache]')
def fetch(name, source, dest):
    """Clone NAME (edm2 or var) at the pinned commit into the cache, where every entry point finds it."""
    up = upstream.get_upstream(name)
    path = upstream.fetch(name, source=source, dest=dest)
    click.echo(f'{name}: {path} at {up.commit}')


@main.command()
@click.argument('name', type=click.Choice(sorted(upstream.UPSTREAMS)))
@click.option('--root', metavar='DIR', default=None, help='An explicit checkout to check.')
def where(name, root):
    """Print the checkout of NAME that the entry points would use, and its commit."""
    path = upstream.locate(name, root)
    commit = upstream.git_commit(path) or 'unknown (not a git checkout)'
    click.echo(f'{path}\t{commit}')


@main.command(context_settings=dict(show_default=True))
@click.option('--outdir', metavar='DIR', default='ddo-demo', help='Where demo.json and demo.png go.')
@click.option('--rounds', metavar='INT', type=click.IntRange(min=1), default=None, help='DDO self-play rounds.  [default: preset]')
@click.option('--seed', metavar='INT', type=int, default=0, help='Random seed; the run is deterministic for a seed.')
@click.option('--alpha', metavar='FLOAT', type=float, default=None, help='DDO alpha (>= 0).  [default: preset]')
@click.option('--beta', metavar='FLOAT', type=float, default=None, help='DDO beta (> 0).  [default: preset]')
@click.option('--preset', type=click.Choice(['default', 'quick']), default='default',
              help='quick: a smaller run for tests (fewer samples and steps).')
def demo(outdir, rounds, seed, alpha, beta, preset):
    """Pretrain a small 2D diffusion model by MLE, then sharpen it with DDO self-play rounds.

    Prints a table per round and writes OUTDIR/demo.json and OUTDIR/demo.png.
    """
    from ddo_patch import demo as demo_mod
    demo_mod.run_demo(outdir=outdir, rounds=rounds, seed=seed, alpha=alpha, beta=beta, preset=preset)


@main.command()
@click.argument('run_dir', metavar='RUN_DIR', type=click.Path(file_okay=False))
@click.option('--backend', 'backend_name', metavar='CLASS', default=None,
              help='The backend that reads RUN_DIR, e.g. var_ext.rounds_backend.RoundsBackend.  [default: the installed one that owns it]')
@click.option('--plot', 'plot_path', metavar='PNG', default=None, help='Where the plot goes.  [default: RUN_DIR/diagnostics.png]')
def inspect(run_dir, backend_name, plot_path):
    """Read one training run of either adapter (edm2_ext.train, var_ext.train): summarise its DDO terms, flag them
    when they leave the healthy range (beta too small or too large, divergence; docs/diagnostics.md), and plot
    them next to its evaluations."""
    from ddo_patch import diagnostics
    from ddo_patch.rounds.backend import installed_backends, load_backend_class
    if not os.path.isdir(run_dir):
        raise DDOPatchError(f'{run_dir} is not a directory; give the --outdir of an edm2_ext.train or var_ext.train run')
    if backend_name:
        backend = load_backend_class(backend_name)
    else:
        installed = installed_backends()
        owners = [cls for cls in installed.values() if cls.owns(run_dir)]
        if len(owners) != 1:
            raise DDOPatchError(f'{run_dir} is not a training run of an installed backend ({", ".join(sorted(installed)) or "none"}): '
                                f'it needs the run\'s training_options.json and log; pass --backend CLASS for another one')
        backend = owners[0]
    settings, log = backend.run_settings(run_dir), backend.training_log(run_dir)
    if not log:
        raise DDOPatchError(f'{run_dir} has no logged training steps yet (the {backend.name} backend reads its log); '
                            f'inspect it after the first status interval')
    evaluations = backend.run_evaluations(run_dir)
    flags = diagnostics.check(log, settings['beta'], evaluations)
    objective = (f'DDO, alpha {settings["alpha"]:g}, beta {settings["beta"]:g}' if settings['objective'] == 'ddo'
                 else 'the MLE control')
    click.echo(f'{run_dir}: {backend.name} run, {objective}; {len(log)} logged steps ({backend.step_unit} '
               f'{log[0]["step"]:g}-{log[-1]["step"]:g}), {len(evaluations)} evaluations')
    summary = diagnostics.summary(log, settings['beta'])
    click.echo('  2nd half: ' + ', '.join(f'{key} {value:.3g}' for key, value in summary.items()))
    if evaluations:
        scores = [e['score'] for e in evaluations]
        click.echo(f'  evaluations: {scores[0]:.4g} (step {evaluations[0]["step"]:g}) -> best {min(scores):.4g} -> last {scores[-1]:.4g}')
    for flag in flags:
        click.echo(f'  {flag.rule}: {flag.reason}')
    if not flags:
        click.echo('  healthy: no rule of docs/diagnostics.md flags this run')
    plot_path = plot_path or os.path.join(run_dir, 'diagnostics.png')
    diagnostics.plot([dict(name=os.path.basename(os.path.normpath(run_dir)), beta=settings['beta'], log=log,
                           evaluations=evaluations, flags=flags)], plot_path, backend.step_unit, 'score', title=run_dir)
    click.echo(f'  plot: {plot_path}')


main.add_command(rounds_cli.rounds)
for command in patch_cli.COMMANDS:
    main.add_command(command)

if __name__ == '__main__':
    main()
