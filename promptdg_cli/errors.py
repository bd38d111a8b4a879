"""The errors promptdg shows as one clear message (never a traceback). Torch-free."""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a config value, a missing folder or file): shown as one message."""


class ConfigError(UserError, ValueError):
    """A config value that is not valid; the message names the key, the value and what is valid."""


class DatasetNotFound(UserError, FileNotFoundError):
    """The dataset folder is missing or not laid out as the config says."""


class WeightsNotFound(UserError, RuntimeError):
    """Pretrained weights are not on disk and cannot be fetched."""


class LDMNotFound(UserError, FileNotFoundError):
    """A latent diffusion model is not on disk and cannot be fetched."""
