"""DDO finetuning presets for the official EDM2 models (paper appendix C).

Pure Python: importable without an EDM2 checkout.

A preset is the hyperparameters of round 1 plus the rounds at which the paper changes them. `resolve`
merges them for a given round, so one command line reproduces any round of the paper:

    ddo-img64-s   EDM2-S ImageNet-64, 24 rounds:  P_std 1.6 and lr 5e-5 in rounds 1-16,
                                                  P_std 3.0 and lr 2e-5 in rounds 17-24.
    ddo-img512-l  EDM2-L ImageNet-512, 28 rounds: P_std 1.6 from round 1, 2.0 from round 18, 3.0 from
                                                  round 22; lr 1e-4 in rounds 1-24, 5e-5 in rounds 25-28.

Duration: the paper trains 6.4M images (5 ImageNet epochs) per round and evaluates every 2^17 (img64) or
2^18 (img512) images. We use 6400Ki = 6,553,600 images (2.4% more) so that the round is a whole number
of evaluation intervals (50 x 2^17, 25 x 2^18) and the last snapshot falls on the last step.
"""

from __future__ import annotations

from ddo_patch.errors import DDOPatchError

_KI, _MI = 1 << 10, 1 << 20

PRESETS = {
    'ddo-img64-s': dict(
        rounds=24, batch=512, lr=5e-5, decay=2000, P_mean=-0.8, P_std=1.6, rampup=1.0, ema_std=0.05,
        duration=6400 * _KI, snapshot=128 * _KI, checkpoint=1 * _MI, status=128 * _KI,
        schedule={17: dict(P_std=3.0, lr=2e-5)},
    ),
    'ddo-img512-l': dict(
        rounds=28, batch=2048, lr=1e-4, decay=800, P_mean=-0.4, P_std=1.6, rampup=1.0, ema_std=0.05,
        duration=6400 * _KI, snapshot=256 * _KI, checkpoint=1 * _MI, status=128 * _KI,
        schedule={18: dict(P_std=2.0), 22: dict(P_std=3.0), 25: dict(lr=5e-5)},
    ),
}


def resolve(preset: str, round: int = 1, **overrides) -> dict:
    """Hyperparameters of `preset` in DDO round `round` (1-based); `overrides` that are not None win."""
    if preset not in PRESETS:
        raise DDOPatchError(f'unknown preset "{preset}"; choose one of {", ".join(PRESETS)}')
    spec = dict(PRESETS[preset])
    schedule = spec.pop('schedule')
    if not 1 <= round <= spec['rounds']:
        raise DDOPatchError(f'--round must be between 1 and {spec["rounds"]} for {preset}, got {round}')
    for first_round in sorted(schedule):
        if round >= first_round:
            spec.update(schedule[first_round])
    spec.update({key: value for key, value in overrides.items() if value is not None})
    return spec
