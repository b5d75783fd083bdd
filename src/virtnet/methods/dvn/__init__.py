"""dvn (being implemented)."""
