"""The OpenAI-compatible HTTP server: a thin shell around the engine.

``app.py`` builds the FastAPI app, ``async_engine.py`` runs the engine's
step loop on its own thread, ``runner.py`` serves it under uvicorn with a
drain on SIGTERM; ``tokenmill serve`` (``commands/serve.py``) wires them.
On the way in: ``middleware.py`` (Host, drain, API key, body size),
``admission.py`` (429 at the door), ``prompts.py`` (size checks, then
tokenization on a thread pool) and ``chat_template.py`` (templates in a
bounded sandbox).
This package's ``__init__`` imports nothing, so that the CLI stays fast.
"""
