"""Persistence of samples, attributions and verdicts (SQLAlchemy 2; built in a later issue)."""
