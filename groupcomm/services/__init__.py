"""Reference services built on the public API (see README.md in this folder)."""
