"""Image counts written as upstream EDM2 writes them ('128Ki', '8Mi', '1Gi', '512'); shared by the EDM2
entry points and the round manager's config files."""

from __future__ import annotations

from ddo_patch.errors import DDOPatchError


def parse_nimg(text) -> int:
    """An image count with an optional binary suffix, as upstream's train_edm2.py: '128Ki', '8Mi', '1Gi', '512'."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, text = text, str(text)
    else:
        text = str(text).strip()
        for suffix, shift in (('Ki', 10), ('Mi', 20), ('Gi', 30)):
            if text.endswith(suffix):
                text, scale = text[:-2], 1 << shift
                break
        else:
            scale = 1
        try:
            value = int(text) * scale
        except ValueError:
            raise DDOPatchError(f'"{text}" is not an image count; write e.g. 512, 128Ki, 8Mi or 1Gi') from None
    if value < 0:
        raise DDOPatchError(f'image counts must be >= 0, got {value}')
    return value
