// Swagger UI over this node's own OpenAPI document; no request leaves the node.
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  docExpansion: "list",
  validatorUrl: null,
  tryItOutEnabled: false,
});
