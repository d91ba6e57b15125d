"""factorywatch: shared wire contracts, topics, settings and logging used by every role.

Public modules: ``contracts`` (wire schemas), ``topics`` (topic layout), ``settings``
(typed settings), ``logs`` (structlog set-up), ``errors`` (exception tree), ``mqtt``
(paho client set-up shared by sensors and detector), ``cli`` (the ``factorywatch`` command).
"""

__version__ = "0.1.0"
