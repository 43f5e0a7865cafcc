"""The `ddo-patch` command line."""

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


main.add_command(rounds_cli.rounds)
for command in patch_cli.COMMANDS:
    main.add_command(command)

if __name__ == '__main__':
    main()
