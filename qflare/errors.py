"""The one root of every error QFLARE raises on purpose.

It lives in a module with no imports so that every layer (crypto, messages, bus, the pure
robust and privacy cores, the services) can subclass it without pulling in another layer.
Bad input carries a stable ``reason`` code on the subclass; configuration mistakes are
``ValueError``/``TypeError`` subclasses that name the offending value.

The command line (:func:`qflare.cli.main`) turns what reaches it into one line on stderr and
an exit code: 2 for a :class:`UsageError` (and any QFLARE ``ValueError``/``TypeError``: bad
input), 130 for an interrupt, 1 for everything else (a runtime failure).
"""


class QflareError(Exception):
    """Root of every error QFLARE raises on purpose."""


class UsageError(QflareError, ValueError):
    """A command was given something it cannot use: bad flags, a bad value, an output path
    it cannot write. Exit code 2."""


class ConfigError(UsageError):
    """The configuration (file, ``QFLARE_*`` variables, flags) is wrong; the message names
    the table and key, the value, and what is allowed."""


class CommandFailed(QflareError):
    """A command ran and failed for a reason its message names (a check that did not pass,
    a service that did not start). Exit code 1, or ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code
