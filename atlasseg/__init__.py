"""atlasseg: multi-atlas segmentation of medical images."""

__version__ = "0.1.0"

from .errors import AtlassegError, ConfigError, ImageError, ManifestError, RegistrationError  # noqa: E402

__all__ = ["__version__", "AtlassegError", "ConfigError", "ImageError", "ManifestError", "RegistrationError"]
