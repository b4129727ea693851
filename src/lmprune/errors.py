"""The error every layer raises for input that cannot run: one line, shown as ``lmprune: error: …`` (exit 2)."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line naming the problem."""
