"""BlockLLM's OpenAI-compatible HTTP API (FastAPI on uvicorn): see app.py."""

from .app import Backend, create_app
from .errors import APIError
from .server import HTTPServer, parse_bind

__all__ = ["APIError", "Backend", "HTTPServer", "create_app", "parse_bind"]
