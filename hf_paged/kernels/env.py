"""hf_paged's on/off environment switches, read by one parser (``HF_PAGED_CUDA_GRAPHS``,
``HF_PAGED_WINDOW_BLOCKS``, ``HF_PAGED_PACKED_PREFILL``, ``HF_PAGED_CASCADE``,
``HF_PAGED_DEFERRED_STOP``, ``HF_PAGED_FUSED_NORMS``).

Here, in the kernels package, so that every module can import it without a cycle (the kernels
import nothing of hf_paged's top level)."""

from __future__ import annotations

import os

ON = ("1", "true", "on", "yes")
OFF = ("0", "false", "off", "no")


def switch(name: str, default: bool | None = True, auto: bool = False) -> bool | None:
    """The switch ``name``: True for 1/true/on/yes, False for 0/false/off/no (any case), ``default``
    when unset or empty, and None for ``auto`` where ``auto`` is allowed. Any other value raises
    ``ValueError`` naming the variable and the values it takes (a typo never silently keeps the
    default)."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if value == "":
        return default
    if value in ON:
        return True
    if value in OFF:
        return False
    if auto and value == "auto":
        return None
    choices = "1 (on), 0 (off)" + (" or auto" if auto else "")
    raise ValueError(f"hf_paged: {name}={raw!r} is not understood: use {choices}")
