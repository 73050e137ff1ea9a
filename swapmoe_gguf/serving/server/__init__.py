"""`swapmoe serve`: llama-server's HTTP API (and OpenAI's, Anthropic's, Ollama's) on the Virtual
Experts runtime. One module per API family over one generation core (core.py, ../engine.py):

    native.py     /completion, /tokenize, /detokenize, /apply-template, /health, /props, /slots, /metrics
    openai.py     /v1/chat/completions, /v1/completions, /v1/models
    responses.py  /v1/responses (OpenAI's Responses API)
    anthropic.py  /v1/messages, /v1/messages/count_tokens
    ollama.py     /api/chat, /api/generate, /api/tags, /api/show, ...
    swapmoe.py    /swapmoe/budget, /swapmoe/state (live.py)
    webui.py      the web page at / (static/), as llama-server's UI paths
    vertex.py     /predict (Google Vertex AI, with AIP_MODE=PREDICTION)
"""
from ..settings import ServerSettings
from .app import PUBLIC_PATHS, create_app, serve
from .core import APIError

__all__ = ["APIError", "PUBLIC_PATHS", "ServerSettings", "create_app", "serve"]
