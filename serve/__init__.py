"""The guard as a service: `omniguard-edge serve` (serve/app.py). Needs the `serve` extra (FastAPI, uvicorn,
prometheus-client); nothing else in the package imports it."""
