"""GLANCE-style twin-surrogate explanations (issue 13; docs/glance.md)."""
