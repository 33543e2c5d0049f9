"""Tenancy: who is calling (API keys as data) and what each caller may see.

``caller``: the authenticated caller and the pure visibility rules; ``http``: the FastAPI dependency that
both APIs use to authenticate a request.
"""
