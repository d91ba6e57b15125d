"""detector: scores every reading and publishes a verdict.

Public modules: ``batch_scoring`` (pure decode -> validate -> score -> verdicts of a batch),
``engine`` (pure: messages and the time in, effects out), ``dedup`` (bounded duplicate cache),
``mosquitto_shell`` and ``jetstream`` (the shells that drive the engine on Mosquitto and on
NATS JetStream).
"""
