"""swapmoe-gguf: SwapMoE (Kong et al., ACL 2024) on llama.cpp GGUF models.

Data flows: `converters` (HF checkpoint or GGUF -> swap-ready GGUF) -> `expert_store` (one
expert's bytes) -> `vmodel` (llama.cpp model with S expert slots per layer) <- `policies` /
`scheduler` (importance from the full router, via `router`) <- `planner` (budget + device
`profile`) -> `runtime.SwapMoELlama` -> `chat` / `server` / `evaluate` / `demo`.
"""
__version__ = "0.1.0"
