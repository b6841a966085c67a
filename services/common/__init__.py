"""Pieces shared by the shopvision services: config parsing, logging, errors, gRPC server wiring."""
