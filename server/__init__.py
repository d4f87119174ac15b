"""The Realtime server: ``spiritlm-edge serve`` (``app.py``), the protocol (``realtime.py``),
the shared model (``engine.py``) and the kiosk page (``static/``)."""
