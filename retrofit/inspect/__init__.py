"""`retrofit inspect`: where compute goes. Routing statistics of one or more models (or routers) over real text at
a sweep of mask ratios, as ``routing.json`` (``gather.py``), figures (``figures.py``) and ``report.md``
(``report.py``). The statistics come from the routing-stats path every evaluation uses (``RoutingStats``)."""
