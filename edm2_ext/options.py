"""Click parameter types shared by the edm2_ext command lines (importable without an EDM2 checkout)."""

import click

from ddo_patch.errors import DDOPatchError
from ddo_patch.sizes import parse_nimg
from edm2_ext.presets import parse_seeds


class _Parsed(click.ParamType):
    """A click type from one of our parse functions, turning its DDOPatchError into click's usage error."""

    def __init__(self, name, parse):
        self.name = name
        self._parse = parse

    def convert(self, value, param, ctx):
        try:
            return self._parse(value)
        except DDOPatchError as err:
            self.fail(str(err), param, ctx)


NIMG = _Parsed('nimg', parse_nimg)
SEEDS = _Parsed('seeds', parse_seeds)

edm2_root = click.option('--edm2-root', metavar='DIR', default=None,
                         help='NVlabs/edm2 checkout.  [default: $EDM2_ROOT, else the `ddo-patch fetch edm2` cache]')
