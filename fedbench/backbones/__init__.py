"""Backbone loaders; every module here registers one scheme (discovered on first use)."""
