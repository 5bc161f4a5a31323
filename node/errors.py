"""Errors shared by every part of the node.

:class:`UserError` is what a stage or a command raises when the message alone tells the
user what is wrong and what to do (bad config, unknown model, unreachable peer); the
CLI prints it as one line, without a traceback, and exits with status 2.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """An error whose message is enough for the user; printed without a traceback."""
