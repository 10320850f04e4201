"""corral.linux."""
