"""Tests of what the docs show people to copy."""
