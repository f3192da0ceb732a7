"""The benchmark driver behind bench/run, bench/metrics, bench/middleware, bench/cache and
bench/compress.

One run starts an origin (nginx serving fixed bodies), the anchors (the origin itself as
`direct`, nginx as a reverse proxy) and the proxies under test, then loads each target in
turn, round after round, and reports medians and same-round ratios. The modules:

* `processes`: starting servers in their own sessions, their CPU time from /proc, stopping
  them;
* `nginx`: the nginx configurations (origin and anchors);
* `bodies`: the JSON the origin serves as /16k.json (and bench/compress_cost.py measures);
* `load`: the load generators (wrk for HTTP/1.1, h2load for h2c) and what they report;
* `figures`: rounds, medians, paired ratios;
* `report`: the printed tables and the JSON file;
* `cli`: the command line and the order of a run.

`bench/httpbench.py` is the executable; bench/README.md describes the method.
"""
