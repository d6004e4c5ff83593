"""The web UI: server-rendered pages for data scientists (templates and assets live in web/).

Pages are rendered on the server with Jinja2 and updated in place with HTMX. They hold no rule of
their own: reads call the domain services, and every change calls the REST API's own endpoint
function in-process (a plain function: the same validation, service call and audit record as
`/api/v1`), with the request's database session and the signed-in token as the principal.
"""
