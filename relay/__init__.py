"""continuity-relay: a self-hosted e-mail continuity relay."""

__version__ = "0.1.0"
