"""Data files shipped with safeguard (the harmless prompt set)."""
