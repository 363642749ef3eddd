"""The fleet console: the web page operators live in, served by the coordinator at ``/``.

The page is static files in :mod:`.static` (plain JavaScript modules and one vendored library, uPlot;
no build step) that call the REST API with the operator's token; :mod:`.feed` says what changed so the
page updates itself over a websocket instead of polling.
"""
