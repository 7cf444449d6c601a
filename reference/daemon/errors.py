"""Build failures and how their texts reach the client."""

from __future__ import annotations


class BuildError(Exception):
    """The build failed; the message is what the client sees (no host paths)."""


class BuildCancelled(BuildError):
    def __init__(self, message: str = "context canceled"):
        super().__init__(message)


class Redactor:
    """Removes the daemon's root directory from texts sent to clients."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")

    def __call__(self, text: str) -> str:
        if self.root and self.root in text:
            text = text.replace(self.root + "/", "").replace(self.root, "<root>")
        return text
