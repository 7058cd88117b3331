"""
The server: one model over HTTP, a chat page for people and the OpenAI API for programs.
Run it from the repository root as `python -m server` (flags: docs/flags.md).

    app.py          the app, its routes and main(): the served model, how an answer is shaped
    batcher.py      continuous batching: every request one row of a shared KV cache
    access.py       who may call (Host, Origin, API key) and how big a body may be
    openai_api.py   the OpenAI API's shapes: requests and their bounds, errors, choices
    page.html       the chat page, one file with its own script
"""
