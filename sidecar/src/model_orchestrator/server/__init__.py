"""HTTP and transport: the route table and its handlers (api), the OpenAI proxy, the fast lane for the status
routes, the answers' schemas and views, the OpenAPI document, errors as HTTP, media URLs, load callbacks, the fleet
list. Reaches the core through the Orchestrator (never lifecycle) and imports everything below it."""
