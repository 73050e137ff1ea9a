"""Residency: which experts are resident and when they move. The importance scheduler (Eq. 1,
`scheduler`), the policies swapmoe / static / exact / full (`policies`), the calibration behind
`static`'s set and `swapmoe`'s prior (`calibration`), memory budgets and the slot count S
(`budget`), the device budget (`device_budget`), counters (`telemetry`), and the protocols
through which they see the runtime (`protocols`). Decisions are pure Python, testable without a
model.

May import: base, fileformat, store, llamacpp.
"""
