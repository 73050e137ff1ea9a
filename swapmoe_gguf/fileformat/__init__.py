"""The file format: GGUF metadata as typed records (`info`), opening a file or a split set
(`reader`, `prescan`, `splits`), the `swapmoe.*` key names (`constants`) and the expert norms of
a file run in place (`norms`, with its sidecar cache).

May import: base.
"""
