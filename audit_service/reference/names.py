"""The reference runs' names and defaults, free of torch so the CLI can offer them without importing it."""

from __future__ import annotations

#: The paper's groups as audit specs: R4 = C4 rotations, T3 = 3-fold cyclic 12-pixel x-translations.
GROUP_SPECS: dict[str, dict] = {
    "R4": {"name": "C4"},
    "T3": {"name": "translation", "order": 3, "step": 12},
}
GROUP_NAMES = tuple(GROUP_SPECS)
MODEL_KINDS = ("WT", "DA", "IR")
DEFAULT_EPOCHS = 300
