"""Conformance suite for the Docker client session protocol."""
