"""corral.leases."""
