"""Reference build client: ``build()`` runs a BuildKit build over a client session."""

from ..dockerhost import DaemonConnectionError
from .build import BuildError, BuildResult, Output, build, post_build

__all__ = ["build", "BuildError", "BuildResult", "DaemonConnectionError", "Output", "post_build"]
