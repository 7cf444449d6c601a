"""pytest plugin entry point: options for pointing the suite at an implementation."""
