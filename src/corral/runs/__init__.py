"""corral.runs."""
