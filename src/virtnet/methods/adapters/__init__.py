"""adapters (being implemented)."""
