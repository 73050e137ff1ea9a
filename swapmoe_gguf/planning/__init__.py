"""Planning: the device profile measured on this machine (`profile`), budget + profile -> a plan
of S, F, Q (`planner`), the cached calibration (`calib_cache`) and the quality floor from a
target (`floor_tuning`). Measurements run on a runtime the caller builds (a factory is passed in).

May import: base, fileformat, store, llamacpp, residency.
"""
