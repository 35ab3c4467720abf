"""Backends: what a :class:`~seqlease.Context` runs on, chosen by feature detection."""
