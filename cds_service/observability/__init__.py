"""Operating the service: Prometheus metrics (metrics.py, with the label bounds in labels.py and the
multiprocess directory in metrics_dir.py) and the log format (logs.py). Nothing here imports the web layer;
the web layer, the storage writer and the FHIR client's read hook feed it."""
