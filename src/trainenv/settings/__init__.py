"""Settings: one row type (``rows``), the training table (``training``) and the serving table
(``serving``, imported on its own by ``trainenv serve``); each resolved once."""

from __future__ import annotations

from trainenv.settings.training import (
    CLUSTER_KEYS,
    DISTRIBUTIONS,
    RDZV_BACKENDS,
    SETTINGS,
    SETTINGS_BY_NAME,
    LaunchSettings,
    resolve_settings,
)
from trainenv.settings.rows import Setting

__all__ = [
    "CLUSTER_KEYS",
    "DISTRIBUTIONS",
    "RDZV_BACKENDS",
    "SETTINGS",
    "SETTINGS_BY_NAME",
    "LaunchSettings",
    "Setting",
    "resolve_settings",
]
