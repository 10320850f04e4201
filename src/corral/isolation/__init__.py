"""corral.isolation.sandbox."""
