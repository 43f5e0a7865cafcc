"""A round's evaluation by racing (`[evaluate] policy = "racing"`; the statistics are `ddo_patch.racing`'s).

With racing a sweep point's job only trains. After each stage of the round (the whole round for the grid; each
rung, then the end, for halving) the stage's new snapshots enter the round's race and one job per level scores
every competitor through the backend (`race_evaluation`): the snapshots still racing, which sample the seeds the
level adds, and those already scored in full, which compete from their stored features without sampling. After
a level the racing snapshots that are unlikely to be the round's best stop; after the last level (every
selection seed) the survivors are final. A run's evaluations are then its snapshots as the race left them:
each with its score at the samples it reached, why it stopped, and a `best` among its final ones only.

The race is in the manifest (round `race`: every snapshot's state, every level's decisions), saved after each
level, so a rerun continues at the next level; a level's job is read back from its status file like any job.
"""

from __future__ import annotations

from ddo_patch import racing
from ddo_patch.errors import DDOPatchError
from ddo_patch.rounds.launch import Job, outcome, run_round_jobs


def levels(cfg, backend) -> list:
    """The sample counts of a race: the configured levels, then every selection seed."""
    return list(cfg.racing['samples']) + [backend.evaluation_samples('select')]


def enter(record, run_name, snapshots) -> None:
    """Add a run's snapshots [(step, path)] to the round's race, unless they are in it already."""
    race = record.setdefault('race', dict(snapshots={}, levels=[]))
    for step, path in snapshots:
        race['snapshots'].setdefault(path, dict(run=run_name, step=step, status='racing', samples=0, score=None,
                                                scores={}, reason=None))


def run(workdir, cfg, backend, launcher, record, stage, active, min_points, save) -> bool:
    """Race the round's racing snapshots through every level at this stage (`stage`: the step it trained to);
    `active`: the names of the stage's sweep points, of which at least `min_points` keep a snapshot in the race.
    False while a level's job is queued; raises on a failed level."""
    race = record.setdefault('race', dict(snapshots={}, levels=[]))
    entries = race['snapshots']
    for samples in levels(cfg, backend):
        if any(level['stage'] == stage and level['samples'] == samples for level in race['levels']):
            continue   # decided before an interruption
        running = sorted(path for path, e in entries.items() if e['status'] == 'racing')
        if not running:
            break
        competitors = running + sorted(path for path, e in entries.items() if e['status'] == 'final')
        name = f'race-{stage}-n{samples}'
        dest = f'{record["dir"]}/race/{name}.json'
        job = Job(name=f'{record["dir"]}-{name}', path=f'{record["dir"]}/race/{name}',
                  commands=[backend.race_evaluation(competitors, samples, dest, f'{record["dir"]}/race/features')])
        statuses = run_round_jobs(workdir, launcher, [job])
        if statuses is False:
            return False
        status = statuses[job.name]
        if status['exit_status'] != 0:
            raise DDOPatchError(f'round {record["round"]}: race level {name} failed ({outcome(status, workdir, job)}); '
                                f'see {workdir}/{job.file("log")}, then rerun')
        results = backend.read_race(f'{workdir}/{dest}')
        final = samples == levels(cfg, backend)[-1]
        for path in running:
            entries[path].update(samples=samples, score=results[path]['score'])
            entries[path]['scores'][str(samples)] = results[path]['score']
        stopped = {} if final else racing.stops(
            {path: results[path]['score'] for path in competitors}, {path: results[path]['leave_out'] for path in competitors},
            {path: entries[path]['run'] if entries[path]['run'] in active else None for path in competitors},
            set(running), min_points, cfg.racing['threshold'])
        for path in stopped:
            entries[path].update(status='stopped', reason=stopped[path])
        if final:
            for path in running:
                entries[path]['status'] = 'final'
        race['levels'].append(dict(stage=stage, samples=samples, competitors=len(competitors), racing=len(running),
                                   stopped=sorted(stopped), job=job.path, wall_seconds=status['wall_seconds']))
        save()
        print(f'round {record["round"]} race at {stage}, {samples} samples: {len(running)} racing, '
              f'{len(stopped)} stopped' + (' (final)' if final else ''), flush=True)
    return True


def evaluations(record, run_name) -> list:
    """A run's evaluations as the race left them, in step order: score at the samples reached, status, why stopped."""
    entries = (record.get('race') or {}).get('snapshots', {})
    return sorted((dict(step=e['step'], snapshot=path, score=e['score'], samples=e['samples'], status=e['status'],
                        **({'reason': e['reason']} if e['reason'] else {}))
                   for path, e in entries.items() if e['run'] == run_name and e['samples'] > 0),
                  key=lambda e: e['step'])
