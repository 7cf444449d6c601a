"""Interop runs: the conformance suite against real peers (dockerd 20.10 in dind, the docker CLI 20.10)."""
