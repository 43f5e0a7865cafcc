"""The matched control of a round (`[control] objective = "mle"`): is a DDO round better than a plain finetune?

A DDO round is also a finetune: a fresh optimiser, a low learning rate, a fresh EMA, and the best of many
snapshots chosen on the selection seeds, each of which improves a model by itself. The control is one more
run per round that shares all of it and only swaps the loss for upstream's maximum-likelihood one: the
backend's sweep-point job with objective 'mle' (`--objective mle` of `edm2_ext.train` / `var_ext.train`),
the round's train options with [control]'s own on top, the same duration, evaluations and selection. It is
submitted with the round's last sweep stage (on SLURM it runs beside the sweep points), recorded under the
round's `control` in the manifest, scored on the report seeds beside the chosen snapshot, and never promoted.

Where it starts (`start`):
- "reference" (default): from the round's reference, the same start as every sweep point of the round;
- "control": from the control's own choice of the previous round (round 1: the pretrained model), a chain of
  MLE finetunes with selection, matched to the chain of DDO rounds, so that round n's DDO choice and round n's
  control choice have had the same number of finetunes and selections.

Its choice is made like a round's: its best snapshot if it beats its start on the selection seeds, else the
start itself (`run` 'start').
"""

from __future__ import annotations

from ddo_patch.rounds.launch import Job

NAME = 'control'


def start(cfg, m, record) -> dict:
    """What the round's control trains from: {'path', 'score' (on the selection seeds), 'source'}."""
    previous = m['rounds'][record['round'] - 2] if record['round'] > 1 else None
    if cfg.control['start'] == 'control' and previous is not None and previous.get('control'):
        chosen = previous['control']['chosen']
        return dict(path=chosen['snapshot'], score=chosen['score'], source=f'round {previous["round"]} control')
    return dict(path=record['reference']['path'], score=record['reference_score'], source=f'round {record["round"]} reference')


def job(cfg, backend, record, begin) -> Job:
    """The control's job in this round, from `begin` (`start`'s answer)."""
    run_dir = f'{record["dir"]}/{NAME}'
    return Job(name=f'{record["dir"]}-{NAME}', path=run_dir,
               commands=backend.run_commands(record['round'], run_dir, begin['path'], None, None, None,
                                             cfg.control_options(record['round']), objective=cfg.control['objective']))


def choose(run, begin) -> dict:
    """The control's choice: its best snapshot if it beats its start (ties to the start), else the start."""
    if run['best'] is not None and run['best']['score'] < begin['score']:
        return dict(run=NAME, step=run['best']['step'], snapshot=run['best']['snapshot'], score=run['best']['score'])
    return dict(run='start', step=0, snapshot=begin['path'], score=begin['score'])
