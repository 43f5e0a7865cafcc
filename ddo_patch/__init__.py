"""ddo-patch: Direct Discriminative Optimization for the official EDM2 and VAR codebases.

`ddo_patch` holds what both backends share: the objectives (`ddo_patch.losses`), the upstream locator
(`ddo_patch.upstream`), metric math (`ddo_patch.metrics`), the toy demo and the `ddo-patch` CLI.
It never imports EDM2 or VAR code.
"""

__version__ = '0.1.0'
