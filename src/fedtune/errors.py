"""User-facing errors: each names the bad input and how to fix it."""


class FedtuneError(Exception):
    """Base of every error a user can cause; the CLI prints it without a traceback."""


class ConfigError(FedtuneError):
    """A config file, flag or --set override is wrong."""


class DataError(FedtuneError):
    """A data source is missing, malformed or empty."""


class ModelError(FedtuneError):
    """A base model or saved run cannot be loaded."""


class IndexStoreError(FedtuneError):
    """A retrieval index is missing, empty, or was built with another embedding model."""


class EndpointError(FedtuneError):
    """A remote model endpoint is unreachable, times out or keeps returning errors."""


class DeploymentError(FedtuneError):
    """A Flower process (SuperLink, SuperNode, `flwr`) could not start, stopped early or
    timed out; the message quotes the end of its log."""
