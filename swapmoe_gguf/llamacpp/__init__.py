"""llama.cpp plumbing: ggml bindings (`ggml`), the model with S expert slots per layer
(`vmodel`, `absent`, `repack`), the eval-callback router tap (`router`, with the C pre-filter
`_evalfilter.c`), the routing read off llama.cpp's graph (`routing`), and experts computed outside
the graph with ggml's kernels (`expert_compute`), ggml's devices and RPC servers (`devices`).

May import: base, fileformat, store.
"""
