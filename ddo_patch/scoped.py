"""Changing an attribute of a class or module for the duration of one call only, and putting it back."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def swapped(owner, name, value):
    """Set `owner.name = value` for the block; restore it (or remove it, if it was inherited) on exit, also on error."""
    with restored(owner, name):
        setattr(owner, name, value)
        yield


@contextlib.contextmanager
def restored(owner, name):
    """Whatever the block does to `owner.name` (code that assigns it for good, like upstream VAR's `build_vae_var`),
    it is `owner`'s own value again on exit, or gone if `owner` only inherited it."""
    had_own = name in vars(owner)
    original = vars(owner).get(name)
    try:
        yield
    finally:
        if had_own:
            setattr(owner, name, original)
        elif name in vars(owner):
            delattr(owner, name)
