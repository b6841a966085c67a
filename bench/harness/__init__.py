"""What every benchmark in ``bench/`` shares; each job module (``run``, ``loadgen``, ``overload``, ``soak``,
``search_bench``, ``ceiling``, ``ghz_data``) builds on these and adds only its own measurement.

* :mod:`bench.harness.load`: the two load shapes (closed and open loop) and the gRPC target they drive;
* :mod:`bench.harness.summary`: a run as ghz's JSON report (percentiles, ok/s), one-line description, plot;
* :mod:`bench.harness.data`: the request data (sample photos as JPEGs of several sizes, their model tensors,
  serialised ``ClassifyRequest`` messages);
* :mod:`bench.harness.procstat`: CPU time and resident memory of process trees, Prometheus counters;
* :mod:`bench.harness.stack`: a private stack on free loopback ports, started and stopped around a run;
* :mod:`bench.harness.results`: the machine a result was measured on and the files results go to.
"""
