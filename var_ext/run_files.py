"""The files of a `var_ext.train` run directory and how its evaluations are keyed, named once for the trainer
and for the round manager's backend. Pure Python: importable without a VAR checkout.
"""

from __future__ import annotations

LAST = 'var-ddo-last.pth'            # plain VAR state dicts (upstream loads them with strict=True)
BEST = 'var-ddo-best.pth'
STATE = 'training-state.pth'         # optimiser, iteration and best score, to resume
LOG = 'log.jsonl'                    # loss terms per logged iteration
METRICS = 'metrics.jsonl'            # one row per evaluation: {'iteration', 'cfg=<w>': score, ..., 'score', 'best'}
OPTIONS = 'training_options.json'

DEFAULT_EVAL_CFG = 1.5               # the guided scale evaluated besides guidance-free (0 = guidance-free only)


def score_key(eval_cfg: float, best_by: str) -> str:
    """The key of the evaluation that selects the best checkpoint: guidance-free, or the guided scale."""
    return 'cfg=0' if best_by == 'free' or not eval_cfg else f'cfg={eval_cfg:g}'
