"""atlasseg: multi-atlas segmentation of medical images.

The Python API (:mod:`atlasseg.api`, imported on first use so that ``import atlasseg`` stays cheap):
:func:`segment`, :func:`register`, :func:`evaluate` and :func:`resolve_config`.
"""

__version__ = "0.1.0"

from .errors import AtlassegError, ConfigError, ImageError, ManifestError, RegistrationError  # noqa: E402

_API = ("segment", "register", "evaluate", "resolve_config", "Segmentation", "Registration")

__all__ = ["__version__", "AtlassegError", "ConfigError", "ImageError", "ManifestError", "RegistrationError", *_API]


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'atlasseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
