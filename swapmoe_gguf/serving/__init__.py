"""Serving: one settings model for flags and server options (`settings`), the streaming
generator (`generate`), chat templates (`chat_template`), parallel slots on one model (`engine`,
`engine_records`, `sampling`) and the HTTP server (`server/`).

May import: base, fileformat, converters, store, llamacpp, residency, planning, runtime.
"""
