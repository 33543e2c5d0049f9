"""Signed webhooks, the context shared by the gateway's routes and the webhook dispatcher.

``ssrf``: which targets may be called (one guard: at registration, at submit, at delivery time);
``signing``: Standard Webhooks secrets and signatures; ``rules``: subscribable event types, limits and
the retry schedule (pure); ``store``: the Postgres adapter (migration 0009).
"""
