"""An Ingress controller on nginx.

model.py turns Ingress, IngressClass, Service, EndpointSlice and TLS Secret
objects into plain routing data (pure, unit-tested); render.py turns that
into one nginx.conf (jinja2 template in templates/); controller.py follows a
source (podnet.kube.events), re-renders on change, checks the candidate with
`nginx -t` and reloads the nginx it started.
"""
