"""detector: scores every reading and publishes a verdict.

Public modules: ``core`` (pure decode -> validate -> score -> verdict), ``dedup`` (bounded
duplicate cache), ``service`` (the thin MQTT shell).
"""
