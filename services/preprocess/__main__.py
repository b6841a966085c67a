"""Run the preprocess service: ``python -m services.preprocess`` (settings from PREPROCESS_* variables)."""
import asyncio
import sys

from services.common.config import ConfigError
from services.common.logging import setup_logging
from services.preprocess.config import PreprocessConfig
from services.preprocess.server import serve


def main() -> None:
    try:
        config = PreprocessConfig.from_env()
    except ConfigError as error:
        sys.exit(f"preprocess: bad configuration: {error}")
    setup_logging("preprocess", config.log_level)
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
