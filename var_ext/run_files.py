"""The files of a `var_ext.train` run directory and how its evaluations are keyed, named once for the trainer
and for the round manager's backend. Pure Python: importable without a VAR checkout.
"""

from __future__ import annotations

from ddo_patch.errors import DDOPatchError

LAST = 'var-ddo-last.pth'            # plain VAR state dicts (upstream loads them with strict=True)
BEST = 'var-ddo-best.pth'
STATE = 'training-state.pth'         # optimiser, iteration and best score, to resume
LOG = 'log.jsonl'                    # loss terms per logged iteration
METRICS = 'metrics.jsonl'            # one row per evaluation: {'iteration', 'cfg=<w>': score per scale, 'score', 'best'}
OPTIONS = 'training_options.json'
TENSORBOARD = 'tb'                   # the same scalars as LOG and METRICS, when tensorboard is installed

# log.jsonl / metrics.jsonl key -> TensorBoard tag in upstream VAR's style (`head/name`, its own tags where the
# quantity is the same: train.py logs lr_max, the gradient norm and the fp16 loss scale under these)
UPSTREAM_TAGS = {'Loss/loss': 'AR_iter_loss/L', 'Loss/grad_norm': 'AR_opt_grad/grad/grad_norm',
                 'Progress/lr': 'AR_opt_lr/lr_max/sche_tlr'}

DEFAULT_EVAL_CFG = (0.0, 1.5)        # the guidance scales evaluated: guidance-free and a moderate guided one
DEFAULT_SELECT_CFG = 0.0             # the scale whose score selects the best checkpoint: guidance-free


def tensorboard_tag(key: str, evaluation: bool = False) -> str:
    """'DDO/delta_real' -> 'AR_iter_ddo/delta_real', 'Loss/loss' -> 'AR_iter_loss/L'; an evaluation's 'cfg=0' -> 'AR_eval/cfg=0'."""
    if evaluation:
        return f'AR_eval/{key}'
    group, _, name = key.partition('/')
    return UPSTREAM_TAGS.get(key) or f'AR_iter_{group.lower()}/{name}'


def parse_scales(value) -> tuple:
    """Guidance scales as written on a command line ('0,1.5') or in a config (0, [0, 1.5], '0,1.5') -> (0.0, 1.5)."""
    parts = value if isinstance(value, (list, tuple)) else str(value).split(',')
    try:
        scales = tuple(float(w) for w in parts)
    except (TypeError, ValueError):
        scales = ()
    if not scales or any(not 0 <= w < float('inf') for w in scales) or len(set(scales)) < len(scales):
        raise DDOPatchError(f'bad guidance scales {value!r}; give distinct numbers >= 0, e.g. 0,1.5 (0 = guidance-free)')
    return scales


def format_scales(scales) -> str:
    """(0.0, 1.5) -> '0,1.5', as parse_scales reads it."""
    return ','.join(f'{w:g}' for w in scales)


def score_key(cfg: float) -> str:
    """The key of the evaluation at guidance scale `cfg` in metrics.jsonl and var_ext.evaluate's JSON: 'cfg=1.5'."""
    return f'cfg={float(cfg):g}'


def check_selected(scales, select_cfg: float, options: str) -> str:
    """The key of the evaluation that selects; raises unless `select_cfg` is one of the evaluated `scales`.
    `options`: how the user wrote the two, e.g. '--eval-cfg/--select-cfg'."""
    if float(select_cfg) not in scales:
        raise DDOPatchError(f'the selecting scale {float(select_cfg):g} is not one of the evaluated scales {format_scales(scales)} '
                            f'({options}); add it or select one of them')
    return score_key(select_cfg)
