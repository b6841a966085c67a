"""Load generation and side-by-side benchmarks of shopvision (``make bench``, ``make loadtest``)."""
