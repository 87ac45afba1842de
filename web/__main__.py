"""Run the web app: ``python -m web`` serves on OTAFLOW_BIND_HOST:OTAFLOW_WEB_PORT."""

from __future__ import annotations

import logging

import uvicorn

from otaflow.settings import load_settings
from web.app import create_app


def main() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = load_settings()
    uvicorn.run(
        create_app(settings),
        host=settings.bind_host,
        port=settings.web_port,
        proxy_headers=False,
    )


if __name__ == "__main__":
    main()
