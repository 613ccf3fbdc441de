"""The package's one exception family: the CLI prints these as one line and exits 2."""


class AtlassegError(Exception):
    """Bad input or a failed stage, described in one line for the user."""


class ConfigError(AtlassegError):
    """A configuration file or override is invalid."""


class ManifestError(AtlassegError):
    """A data manifest is invalid or names files that cannot be used."""


class ImageError(AtlassegError):
    """An image or label map cannot be read, written or used."""


class RegistrationError(AtlassegError):
    """A registration could not be run or produced an unusable result."""
