"""Protobuf message modules generated from proto/*.proto by `tox -e proto`; do not edit them by hand."""
