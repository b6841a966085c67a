"""Run the gateway: ``python -m services.gateway`` (settings from GATEWAY_* variables)."""
import asyncio
import sys

from services.common.config import ConfigError
from services.common.logging import setup_logging
from services.gateway.config import GatewayConfig
from services.gateway.server import serve


def main() -> None:
    try:
        config = GatewayConfig.from_env()
    except ConfigError as error:
        sys.exit(f"gateway: bad configuration: {error}")
    setup_logging("gateway", config.log_level)
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
