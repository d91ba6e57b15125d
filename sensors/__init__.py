"""sensors: simulated machines that follow the AI4I generation rules, and their publishers.

Public modules: ``simulator`` (pure reading generator with anomaly injection), ``replay``
(CSV rows as readings), ``publisher`` (the thin MQTT shell).
"""
