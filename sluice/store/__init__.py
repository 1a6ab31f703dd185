"""Data access: every SQL statement Sluice runs lives in this package."""
