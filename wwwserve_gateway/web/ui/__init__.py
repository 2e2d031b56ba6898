"""The operator's dashboard (`/ui`) and the API docs (`/docs`), served by the node itself.

Every asset ships in the package (`static/`, with the vendored uPlot and Swagger UI files and their
licences). The dashboard reads the node's services only while someone watches: its sampler runs while
a live feed (SSE) has subscribers, and nothing it does is on the request path.
"""
