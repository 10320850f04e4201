"""corral.cli.main."""
