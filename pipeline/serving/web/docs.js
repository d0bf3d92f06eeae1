// The API documentation page (/docs): Swagger UI over /docs.json, with the API token this tab
// keeps (the clinicians' page asks for it; "Authorize" sets it here too). A separate file: the
// Content-Security-Policy allows no inline script.
"use strict";
const TOKEN_KEY = "lesionflow.token";
window.ui = SwaggerUIBundle({
  url: "/docs.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
  layout: "BaseLayout",
  requestInterceptor: (req) => {
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token && !req.headers.Authorization) req.headers.Authorization = "Bearer " + token;
    return req;
  },
});
