"""The one root of every error QFLARE raises on purpose.

It lives in a module with no imports so that every layer (crypto, messages, bus, the pure
robust and privacy cores, the services) can subclass it without pulling in another layer.
Bad input carries a stable ``reason`` code on the subclass; configuration mistakes are
``ValueError``/``TypeError`` subclasses that name the offending value.
"""


class QflareError(Exception):
    """Root of every error QFLARE raises on purpose."""
