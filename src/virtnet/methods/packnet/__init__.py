"""packnet (being implemented)."""
