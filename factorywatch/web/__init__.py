"""The web view (``factorywatch web``): live machine tiles, open alerts, machine pages, history.

An application on top of the broker and the history store: it imports from factorywatch,
nothing imports it. Public: :func:`factorywatch.web.app.create_app`, :class:`WebSettings`.
"""
