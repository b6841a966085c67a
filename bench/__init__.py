"""shopvision's benchmarks: one module per job (``run`` is ``make bench``, ``loadgen``, ``overload``, ``soak``,
``search_bench``, ``ceiling``, ``pipeline``, ``ghz_data``, ``gpu/``) on a shared harness (:mod:`bench.harness`);
the systems ``make bench`` compares besides the stack: ``naive_server``, ``triton_decode/`` (JPEG-in Triton
ensemble) and ``peers/`` (serving frameworks in their own environments)."""
