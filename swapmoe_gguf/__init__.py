"""swapmoe-gguf: SwapMoE (Kong et al., ACL 2024) on llama.cpp GGUF models.

Layout: `converters` (HF/GGUF -> swap-ready GGUF), `gguf_info` (typed GGUF metadata),
`inspect`, `cli`. The runtime, scheduler and planner build on these.
"""
__version__ = "0.1.0"
