"""``python -m openai_frontend``: serve the OpenAI-compatible API with uvicorn.

Every setting is an environment variable ``MINICPMV_FRONTEND_<NAME>`` (see settings.py); the flags below
override the most common ones."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openai_frontend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port to listen on (default 9000)")
    parser.add_argument("--triton-grpc-url", help="Triton's gRPC address, host:port (default 127.0.0.1:8001)")
    parser.add_argument("--triton-http-url", help="Triton's HTTP address, host:port (default 127.0.0.1:8000)")
    parser.add_argument("--models", help="comma-separated Triton model names to serve (default: all ready)")
    parser.add_argument("--api-key", action="append", dest="api_keys",
                        help="accepted API key, 'key' or 'key:tenant' (repeatable)")
    parser.add_argument("--admin-api-key", action="append", dest="admin_api_keys",
                        help="API key that sees every tenant's files and batches (repeatable)")
    parser.add_argument("--log-level", help="critical, error, warning, info (default) or debug")
    args = parser.parse_args(argv)

    from openai_frontend.settings import Settings

    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        # Without the values: a wrong API key entry must not end up in a log.
        problems = "\n".join(f"  {'.'.join(map(str, err['loc']))}: {err['msg']}"
                             for err in e.errors(include_url=False, include_input=False))
        print(f"openai_frontend: invalid settings:\n{problems}", file=sys.stderr)
        return 2

    import uvicorn

    from openai_frontend.app import create_app

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=5)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
