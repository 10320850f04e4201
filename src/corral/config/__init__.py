"""corral.config.settings."""
