"""nexusgen package."""
