"""The HTTP service (`kindling serve`): FastAPI routes over the library, for the `serve` extra.

Nothing here is imported by `import engine` or by the other CLI commands: fastapi and uvicorn
load only when a service is built (`create_app`) or run (`server.serve`).
"""
