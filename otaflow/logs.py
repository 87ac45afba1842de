"""Logging set-up shared by otaflow's long-running processes."""

from __future__ import annotations

import logging
import os


def configure_logging(process: str) -> None:
    """Log to stderr with the process name; the level comes from OTAFLOW_LOG_LEVEL."""
    logging.basicConfig(
        level=os.environ.get("OTAFLOW_LOG_LEVEL", "INFO").upper(),
        format=f"%(asctime)s %(levelname)s {process} %(name)s: %(message)s",
    )
