"""The OpenAI-compatible HTTP server: a thin shell around the engine.

``app.py`` builds the FastAPI app, ``async_engine.py`` runs the engine's
step loop on its own thread, ``runner.py`` serves it under uvicorn with a
drain on SIGTERM; ``tokenmill serve`` (``commands/serve.py``) wires them.
This package's ``__init__`` imports nothing, so that the CLI stays fast.
"""
