"""Errors a user can cause.

The CLIs print these as one line without a traceback; anything else is a bug
and keeps its traceback.
"""


class HiertrainError(Exception):
    """A problem with the user's input or environment, stated with its fix.

    ``exit_code`` is what the CLIs exit with (``toolkit.core.entry.ExitCode``):
    scripts and fleet supervisors tell a bad configuration (3) from a broker that
    is down (4) or a run that stopped short (5) without parsing the message.
    """

    exit_code = 3


class ExportError(HiertrainError):
    """The model cannot be exported as asked (unsupported op, over budget...)."""


class ManifestError(HiertrainError):
    """An artifacts directory or manifest is missing, malformed or tampered with."""


class WireError(HiertrainError):
    """A wire message is malformed (bad magic, version, CRC, shape...)."""

    def __init__(self, message: str = "", *, reason: str = "malformed") -> None:
        """Keep `reason`, a short stable code ("crc", "truncated"...), next to the text.

        Receivers count dropped messages by cause; matching on message text would
        break whenever a sentence is reworded.
        """
        super().__init__(message)
        self.reason = reason


class BrokerUnreachableError(HiertrainError):
    """The MQTT broker (or serial gateway) did not answer within the connect timeout."""

    exit_code = 4


class RunIncompleteError(HiertrainError):
    """The run stopped before its work was done (timed out, batches missing, peer gone)."""

    exit_code = 5
