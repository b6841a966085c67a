"""shopvision's benchmarks: one module per job (``run`` is ``make bench``, ``loadgen``, ``overload``, ``soak``,
``search_bench``, ``ceiling``, ``ghz_data``, ``gpu/``) on a shared harness (:mod:`bench.harness`)."""
