"""Click parameter types shared by the edm2_ext command lines (importable without an EDM2 checkout)."""

import os

import click

from ddo_patch.errors import DDOPatchError
from ddo_patch.sizes import parse_nimg
from ddo_patch.seeds import parse_seeds


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


def _number_list(kind):
    def parse(text):
        try:
            return [kind(part) for part in str(text).split(',') if part.strip()]
        except ValueError:
            raise DDOPatchError(f'"{text}" is not a comma-separated list of {kind.__name__}s, e.g. 1,2,2') from None
    return parse


NIMG = _Parsed('nimg', parse_nimg)
SEEDS = _Parsed('seeds', parse_seeds)
INT_LIST = _Parsed('list', _number_list(int))
FLOAT_LIST = _Parsed('list', _number_list(float))

edm2_root = click.option('--edm2-root', metavar='DIR', default=None,
                         help='NVlabs/edm2 checkout.  [default: $EDM2_ROOT, else the `ddo-patch fetch edm2` cache]')


# Precision modes measured to keep >= 90 % of fp32's FID gain in benchmarks/digits_precision.py (docs/edm2.md);
# DDO_PATCH_PRECISION_STUDY=1 offers every mode, to measure them.
MEASURED_SAFE = ('fp32', 'tf32', 'bf16', 'fp16')


def offered_precisions() -> tuple:
    """What `edm2_ext.train --precision` accepts (the round manager checks configs with it: torch is imported only
    for a study, so that a restarted manager starts fast)."""
    if os.environ.get('DDO_PATCH_PRECISION_STUDY') == '1':
        from ddo_patch.precision import MODES
        return MODES
    return MEASURED_SAFE
