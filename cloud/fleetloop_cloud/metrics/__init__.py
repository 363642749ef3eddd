"""The coordinator's metrics: what the services and surfaces observe, through narrow interfaces each of
them owns (``IngestMetrics``, ``QueryMetrics``, ``HttpMetrics``), kept by one object per coordinator.
:mod:`.prometheus` is that object for ``/metrics`` (the only module importing prometheus_client);
:mod:`.memory` is the in-memory fake beside it; :mod:`.watches` says what is read at scrape time."""
