"""Peers ``make bench`` compares the stack against that run in their own virtual environments (``.cache/peers/``).

* :mod:`bench.peers.ray_serve`: Ray Serve with its gRPC ingress, serving ``shopvision.v1.ProductRecognition``;
  its pinned requirements are ``bench/peers/ray-requirements.txt``, its launcher
  :class:`bench.targets.RayServePeer`.

Modules here import only what their own environment has (never ``bench.harness`` or ``devstack``).
"""
