"""The node's HTTP application: the OpenAI routes' fast path, health, metrics, the admin API and the
network's views, assembled from the services the node hands over (`app.AppParts`)."""
