"""BIRD 2 configurations for calico-lite: jinja2 templates (templates/) and render.py."""
