"""Error types shared by the sans-IO core and its adapters."""


class SessionError(Exception):
    """Base class for everything the reference implementation raises on purpose."""


class ProtocolError(SessionError):
    """The peer broke a rule of the protocol; the message says which and how."""


class ValidationError(ProtocolError):
    """A path or Stat in an incoming listing fails the receiver's validator."""


class PeerError(SessionError):
    """The peer reported an error with a PACKET_ERR."""
