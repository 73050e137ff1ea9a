"""Commands: `swapmoe` and its sub-commands (`cli`): convert, inspect, plan, chat, serve, eval
(`evaluate`), bench (`benchmark`, `bench_speed`, `bench_report`, `bench_scale`), demo, rpc-server (`devices`).

May import: base, fileformat, converters, store, llamacpp, residency, planning, runtime, serving.
"""
